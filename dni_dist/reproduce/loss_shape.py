"""The loss a linear SG implies, against the true loss, over a 2-D grid of inputs.

A linear SG, SG(h, y) = h A + y B + C, is the gradient of
L_hat(h, y) = 1/2 h A h^T + (y B + C) h^T (+ a constant per label, lost), so every SG
module carries a picture of the loss its lower part is minimising (NOTES: "The loss a
linear SG implies"). Choices made here: a regular grid over [-2, 2]^2 labelled by a
random linear rule with 10% of labels flipped ("noisy") or with all labels random; two
classes, one-hot; a ReLU MLP of 4 hidden layers of 32; one SG between the output and the
loss, or an SG at every cut (5); MSE or log loss; batch 100, Adam 1e-3. With one-hot
labels the lost constant is the same for every example, so rank correlations between
L_hat and the true per-example loss are meaningful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from dni_dist.reproduce.common import Run, build, figure, fit, publish, save

FINDING = (
    "The loss reconstructed from a linear SG tracks the true loss well for MSE, better near "
    "the top of the network and early in training; for log loss on nearly separable data it "
    "fails late in training."
)


def implied_loss(run: Run, stage_index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example 1/2 h A h^T + (y B + C) h^T of the linear SG at ``stage_index``'s output."""
    h = x
    for stage in run.stages[: stage_index + 1]:
        h = stage.predict(h)
    h = h.flatten(1)
    sg = run.stages[stage_index].boundary.sg
    a = sg.core.A.weight  # SG = h a^T + ..., so A = a^T
    context = run.data.task.context(y)
    linear = sg.bias.flatten() + (sg.label(context) if sg.label is not None else 0.0)
    return (0.5 * ((h @ a.T) * h).sum(1) + (linear * h).sum(1)).detach()


def true_loss(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = run.engine.predict(x)
    task = run.data.task
    if task.loss_name == "mse":
        return 0.5 * (out - task.context(y)).pow(2).sum(1)
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def run(out: Path, quick: bool) -> dict[str, Any]:
    epochs = 30 if quick else 120
    every = 3 if quick else 10
    side = 30 if quick else 50
    results: dict[str, Any] = {}
    snapshots: dict[str, list[dict[str, Any]]] = {}
    for labels in ("noisy", "random"):
        for loss in ("mse", "log"):
            for layout, cuts in (("one SG", "[5]"), ("SG every cut", "[1,2,3,4,5]")):
                segments = 2 if layout == "one SG" else 6
                key = f"{labels}/{loss}/{layout}"
                r = build(
                    "data.name=artificial",
                    "data.grid=true",
                    "data.outputs=2",
                    f"data.labels={labels}",
                    f"data.samples={side * side}",
                    "data.batch_size=100",
                    f"data.loss={loss}",
                    "model.depth=4",
                    "model.width=32",
                    f"segments={segments}",
                    f"cuts={cuts}",
                )
                series: list[dict[str, Any]] = []
                grids: list[dict[str, Any]] = []

                def record(run_: Run, epoch: int, series=series, grids=grids) -> None:
                    x, y = run_.data.x_train, run_.data.y_train
                    truth = true_loss(run_, x, y)
                    corr = [
                        float(spearmanr(truth, implied_loss(run_, k, x, y)).statistic)
                        for k in range(len(run_.stages) - 1)
                    ]
                    series.append({"epoch": epoch, "spearman": corr})
                    grids.append({"epoch": epoch, "true": truth, "top": implied_loss(run_, len(run_.stages) - 2, x, y)})

                fit(r, epochs=epochs, every=every, on_record=record)
                results[key] = {"series": series, "final_train_loss": r.history[-1]["train_loss"]}
                snapshots[key] = [grids[0], grids[len(grids) // 2], grids[-1]]
    figures = [_plot_grids(snapshots, side, out), _plot_correlations(results, out)]
    return publish(out, "loss-shape", FINDING, quick, epochs=epochs, grid_side=side, results=results, figures=figures)


def _plot_grids(snapshots: dict[str, list[dict[str, Any]]], side: int, out: Path) -> str:
    keys = [k for k in snapshots if k.endswith("/one SG")]
    fig, axes = figure(len(keys), 6, size=(1.9, 1.9))
    for row, key in enumerate(keys):
        for i, snap in enumerate(snapshots[key]):
            for j, (name, values) in enumerate((("true", snap["true"]), ("SG's", snap["top"]))):
                ax = axes[row][2 * i + j]
                ax.imshow(values.view(side, side).T.numpy(), origin="lower", cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{name} ep {snap['epoch']}", fontsize=7)
        axes[row][0].set_ylabel(key.replace("/one SG", ""), fontsize=7)
    return save(fig, out / "loss-shape-grids.png")


def _plot_correlations(results: dict[str, Any], out: Path) -> str:
    keys = [k for k in results if k.endswith("/SG every cut")]
    fig, axes = figure(1, len(keys), size=(3.2, 2.8))
    for ax, key in zip(axes[0], keys, strict=True):
        series = results[key]["series"]
        epochs = [s["epoch"] for s in series]
        for layer in range(len(series[0]["spearman"])):
            ax.plot(epochs, [s["spearman"][layer] for s in series], label=f"SG {layer + 1}")
        ax.set_title(key.replace("/SG every cut", ""), fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylim(-1, 1)
    axes[0][0].set_ylabel("Spearman(true, implied)")
    axes[0][-1].legend(fontsize=6)
    return save(fig, out / "loss-shape-correlation.png")
