"""The family the paper unifies, trained on one task: curves, final accuracy, and the
table's locking columns as measured (NOTES: the unified "conspiring networks" view).

Choices made here: digits; the default MLP (3 x 256 ReLU) cut into 3 segments so a middle
stage shows what it waits for; Adam 1e-3; Kickback on MSE (its softmax signal is zero).
The columns are read from what each lower stage's updates actually waited for: nothing,
the gradient from the stage above, or the output error straight from the top. Each fixed
method is also checked against its classic direct rule on one batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dni_dist.core.feedback import FALinear
from dni_dist.core.methods import METHODS
from dni_dist.data import batches
from dni_dist.reproduce.common import Run, build, figure, fit, publish, save

FINDING = (
    "Backprop, SG, SG+prop, FA, DFA and Kickback are all one SG module with a different form, "
    "target and loss; only SG is update- and backwards-unlocked, and only DFA and Kickback send the "
    "error directly."
)


def measured_columns(run: Run) -> dict[str, bool]:
    lower = [s.stats for s in run.stages[:-1]]
    return {
        "update locked": all(s.updates_without_waiting == 0 for s in lower),
        "backwards locked": any(s.updates_after_grad > 0 for s in lower),
        "direct error": any(s.updates_after_error > 0 for s in lower),
    }


def classic_signal_gap(method: str) -> float:
    """Max |SG-form signal - classic rule| at the cut of a fresh 2-segment model, one batch."""
    r = build(f"method={method}", "segments=2")
    x, y = next(batches(r.data.x_train, r.data.y_train, 64, 0, 0))
    bottom, top = r.stages
    h = bottom.module(x).detach()
    ctx = r.data.task.context(y)
    h_req = h.clone().requires_grad_(True)
    out = top.module(h_req)
    loss = r.data.task.loss(out, y)
    grad_h, e = torch.autograd.grad(loss, [h_req, out])
    boundary = bottom.boundary
    if method == "backprop":
        classic, received = grad_h, grad_h
    elif method in ("dfa", "kickback"):
        matrix = boundary.projection if method == "dfa" else torch.ones_like(boundary.projection)
        classic, received = e @ matrix.T, e
    else:  # fa: the random-feedback chain through the upper segment ([Linear-ReLU], [Linear]), by hand
        received = grad_h  # what the FA layers above pass down
        hidden, head = [m for m in top.module.modules() if isinstance(m, FALinear)]
        pre_activation = torch.nn.functional.linear(h, hidden.weight, hidden.bias)
        classic = ((e @ head.feedback) * (pre_activation > 0)) @ hidden.feedback
    return float((boundary.signal(h, ctx, received) - classic).abs().max())


def run(out: Path, quick: bool) -> dict[str, Any]:
    epochs = 8 if quick else 30
    results: dict[str, Any] = {}
    for method in METHODS:
        r = fit(build(f"method={method}", "segments=3"), epochs=epochs)
        boundary = r.stages[0].boundary
        results[method] = {
            "history": r.history,
            "test_accuracy": r.history[-1]["test_accuracy"],
            "loss": r.data.task.loss_name,
            "measured": measured_columns(r),
            "table": {
                "update locked": boundary.update_locked,
                "backwards locked": boundary.backwards_locked,
                "direct error": boundary.direct_error,
            },
        }
    gaps = {m: classic_signal_gap(m) for m in ("backprop", "fa", "dfa", "kickback")}
    figures = [_plot(results, out)]
    return publish(
        out,
        "family",
        FINDING,
        quick,
        epochs=epochs,
        results=results,
        sg_form_vs_classic_max_abs_diff=gaps,
        figures=figures,
    )


def _plot(results: dict[str, Any], out: Path) -> str:
    fig, axes = figure(1, 1, size=(4.6, 3.2))
    ax = axes[0][0]
    for method, r in results.items():
        ax.plot([h["epoch"] for h in r["history"]], [h["test_accuracy"] for h in r["history"]], label=method)
    ax.set(xlabel="epoch", ylabel="test accuracy", title="The family on digits (K=3)")
    ax.legend(fontsize=7)
    return save(fig, out / "family.png")
