"""Learning curves: backprop vs one SG in the middle vs an SG at every cut, conditioned or
not, ReLU and sigmoid, with batch norm, several depths (NOTES: "MNIST learning curves").

Choices made here: digits by default (MNIST when ``data_dir`` holds its IDX files), MLPs
of 256 units with batch norm, Adam 1e-3, batch 64, linear SGs; "in the middle" is the cut
after block (depth + 1) // 2; quick: depth 4, 8 epochs; full: depths 3, 6 and 10, 30 epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dni_dist.reproduce.common import build, figure, fit, publish, save

FINDING = "SG models converge about as well as backprop, often faster, for ReLU and sigmoid nets of several depths."


def variants(depth: int) -> dict[str, tuple[str, ...]]:
    middle = (depth + 1) // 2
    every = ",".join(str(i) for i in range(1, depth + 1))
    return {
        "backprop": ("method=backprop", "segments=1"),
        "SG middle, cond": ("method=sg", "segments=2", f"cuts=[{middle}]"),
        "SG middle, uncond": ("method=sg", "segments=2", f"cuts=[{middle}]", "sg.conditioned=false"),
        "SG every cut, cond": ("method=sg", f"segments={depth + 1}", f"cuts=[{every}]"),
        "SG every cut, uncond": ("method=sg", f"segments={depth + 1}", f"cuts=[{every}]", "sg.conditioned=false"),
    }


def run(out: Path, quick: bool, data_dir: str | None = None) -> dict[str, Any]:
    depths = [4] if quick else [3, 6, 10]
    epochs = 8 if quick else 30
    dataset = ("data.name=mnist", f"data.path={data_dir}") if data_dir else ("data.name=digits",)
    results: dict[str, Any] = {}
    for activation in ("relu", "sigmoid"):
        for depth in depths:
            for name, extra in variants(depth).items():
                r = fit(
                    build(
                        *dataset,
                        f"model.depth={depth}",
                        f"model.activation={activation}",
                        "model.batch_norm=true",
                        *extra,
                    ),
                    epochs=epochs,
                )
                results[f"{activation}/depth {depth}/{name}"] = r.history
    figures = [_plot(results, depths, out)]
    final = {k: v[-1]["test_accuracy"] for k, v in results.items()}
    name = dataset[0].split("=")[1]
    return publish(
        out,
        "curves",
        FINDING,
        quick,
        dataset=name,
        epochs=epochs,
        results=results,
        final_test_accuracy=final,
        figures=figures,
    )


def _plot(results: dict[str, Any], depths: list[int], out: Path) -> str:
    panels = [(a, d) for a in ("relu", "sigmoid") for d in depths]
    fig, axes = figure(1, len(panels), size=(3.3, 2.8))
    for ax, (activation, depth) in zip(axes[0], panels, strict=True):
        prefix = f"{activation}/depth {depth}/"
        for key, history in results.items():
            if key.startswith(prefix):
                ax.plot([h["epoch"] for h in history], [h["test_accuracy"] for h in history], label=key[len(prefix) :])
        ax.set_title(f"{activation}, {depth} hidden", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(0.0, 1.0)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=6)
    return save(fig, out / "curves.png")
