"""Representations per layer: dissimilarity matrices, linear probes, weight norms
(NOTES: "Representations").

Choices made here: digits; a ReLU MLP of 4 hidden layers of 128 trained 8 (quick) or 30
epochs with Adam 1e-3 and weight decay 1e-4 (the small L2 penalty); backprop, one SG in the
middle (after layer 2) and an SG after every layer; RDMs on 200 (quick) or 400 label-sorted
test points; probes are logistic regressions trained on 600 training points' activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dni_dist.reproduce.common import Run, build, figure, fit, publish, save

FINDING = (
    "Backprop reaches its final representation early and later layers add confidence; with SG the "
    "layers below the module represent differently; with SG everywhere each layer adds a little."
)
VARIANTS = {
    "backprop": ("method=backprop", "segments=1"),
    "SG middle": ("method=sg", "segments=2", "cuts=[2]"),
    "SG every layer": ("method=sg", "segments=5", "cuts=[1,2,3,4]"),
}


@torch.no_grad()
def layer_outputs(run: Run, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every hidden block (all but the head), in order."""
    blocks = [b for s in run.stages for b in s.module]
    outs, h = [], x
    for block in blocks[:-1]:
        block.eval()
        h = block(h)
        outs.append(h.flatten(1))
    return outs


def rdm(h: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.corrcoef(h)


def probe_accuracy(train_h: torch.Tensor, y_train: torch.Tensor, test_h: torch.Tensor, y_test: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=500).fit(train_h[:600].numpy(), y_train[:600].numpy())
    return float(model.score(test_h.numpy(), y_test.numpy()))


def weight_norms(run: Run) -> list[float]:
    linears = [m for s in run.stages for m in s.module.modules() if isinstance(m, nn.Linear)]
    norms = [float(m.weight.detach().pow(2).sum()) for m in linears]
    total = sum(norms)
    return [n / total for n in norms]


def run(out: Path, quick: bool) -> dict[str, Any]:
    epochs = 8 if quick else 30
    points = 200 if quick else 400
    results: dict[str, Any] = {}
    rdms: dict[str, list[torch.Tensor]] = {}
    for name, extra in VARIANTS.items():
        r = fit(build("model.depth=4", "model.width=128", "optim.weight_decay=1e-4", *extra), epochs=epochs)
        d = r.data
        order = torch.argsort(d.y_test[:points], stable=True)
        sorted_x = d.x_test[:points][order]
        train_h = layer_outputs(r, d.x_train)
        test_h = layer_outputs(r, d.x_test)
        rdms[name] = [rdm(h) for h in layer_outputs(r, sorted_x)]
        results[name] = {
            "test_accuracy": r.history[-1]["test_accuracy"],
            "probe_accuracy": [probe_accuracy(a, d.y_train, b, d.y_test) for a, b in zip(train_h, test_h, strict=True)],
            "weight_norms": weight_norms(r),
        }
    figures = [_plot_rdms(rdms, out), _plot_layers(results, out)]
    return publish(
        out, "representations", FINDING, quick, epochs=epochs, points=points, results=results, figures=figures
    )


def _plot_rdms(rdms: dict[str, list[torch.Tensor]], out: Path) -> str:
    layers = len(next(iter(rdms.values())))
    fig, axes = figure(len(rdms), layers, size=(1.9, 1.9))
    for row, (name, mats) in enumerate(rdms.items()):
        for col, mat in enumerate(mats):
            ax = axes[row][col]
            ax.imshow(mat.numpy(), cmap="magma", vmin=0, vmax=2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"layer {col + 1}", fontsize=7)
        axes[row][0].set_ylabel(name, fontsize=7)
    return save(fig, out / "representations-rdm.png")


def _plot_layers(results: dict[str, Any], out: Path) -> str:
    fig, axes = figure(1, 2, size=(3.6, 2.8))
    for name, r in results.items():
        axes[0][0].plot(range(1, len(r["probe_accuracy"]) + 1), r["probe_accuracy"], marker="o", label=name)
        axes[0][1].plot(range(1, len(r["weight_norms"]) + 1), r["weight_norms"], marker="o", label=name)
    axes[0][0].set(xlabel="layer", ylabel="linear probe test accuracy")
    axes[0][1].set(xlabel="layer (last = output)", ylabel="share of squared weight norm")
    axes[0][1].legend(fontsize=7)
    return save(fig, out / "representations-layers.png")
