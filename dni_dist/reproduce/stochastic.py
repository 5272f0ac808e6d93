"""Stochastic updates (DNI paper): every stage updates only with probability p per step.

Choices made here: digits; MLP 3 x 256 ReLU with an SG at every cut (4 segments); the
top segment follows the same rule; Adam 1e-3; p in {1, 0.2, 0.05} (quick, 60 epochs) or
{1, 0.5, 0.2, 0.1, 0.05} (full, 150 epochs); conditioned (cDNI) vs unconditioned SG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dni_dist.reproduce.common import build, figure, fit, publish, save

FINDING = "cDNI still trains when each layer updates with a probability as low as 5% per step."


def run(out: Path, quick: bool) -> dict[str, Any]:
    probs = [1.0, 0.2, 0.05] if quick else [1.0, 0.5, 0.2, 0.1, 0.05]
    epochs = 60 if quick else 150
    results: dict[str, dict[str, float]] = {"cDNI": {}, "DNI": {}}
    for name, conditioned in (("cDNI", "true"), ("DNI", "false")):
        for p in probs:
            r = build("segments=4", f"update_prob={p}", f"sg.conditioned={conditioned}")
            fit(r, epochs=epochs, every=epochs)
            results[name][str(p)] = r.history[-1]["test_accuracy"]
    fig, axes = figure(1, 1, size=(4.2, 3.0))
    ax = axes[0][0]
    for name, accs in results.items():
        ax.plot([float(p) for p in accs], list(accs.values()), marker="o", label=name)
    ax.set_xscale("log")
    ax.set(xlabel="update probability p", ylabel="final test accuracy", ylim=(0, 1))
    ax.axhline(0.1, color="grey", lw=0.8, ls="--")
    ax.legend()
    figures = [save(fig, out / "stochastic-updates.png")]
    return publish(out, "stochastic-updates", FINDING, quick, epochs=epochs, results=results, figures=figures)
