"""``OUT/report.md``: each figure beside the paper's finding and what we measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _artificial(r: dict[str, Any]) -> str:
    mse = [x for x in r["rows"] if x["loss"] == "mse" and x.get("relative gap sg linear") is not None]
    worst = max(abs(x["relative gap sg linear"]) for x in mse)
    sep = [x for x in r["rows"] if x["loss"] == "log" and x["labels"] == "separable"]
    rnd = [x for x in r["rows"] if x["loss"] == "log" and x["labels"] == "random"]
    lines = [f"MSE (noisy data): largest relative gap of linear SG to the least-squares optimum {worst:.1e}."]
    for x in sep:
        lines.append(
            f"Separable, {x['model']}, {x['dim']}-D: log-loss gap to backprop, linear SG "
            f"{x['gap sg linear']:+.4f}, sigmoid SG {x['gap sg sigmoid']:+.4f}."
        )
    lines.append("Random labels: largest |gap| of linear SG " + f"{max(abs(x['gap sg linear']) for x in rnd):.4f}.")
    return " ".join(lines)


def _loss_shape(r: dict[str, Any]) -> str:
    parts = []
    for key, v in r["results"].items():
        first, last = v["series"][0]["spearman"][-1], v["series"][-1]["spearman"][-1]
        parts.append(f"{key}: top SG Spearman {first:.2f} (epoch {v['series'][0]['epoch']}) -> {last:.2f} (end)")
    return "; ".join(parts) + "."


def _curves(r: dict[str, Any]) -> str:
    return "Final test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in r["final_test_accuracy"].items()) + "."


def _representations(r: dict[str, Any]) -> str:
    return " ".join(
        f"{name}: test {v['test_accuracy']:.3f}, probes per layer {', '.join(f'{a:.3f}' for a in v['probe_accuracy'])}."
        for name, v in r["results"].items()
    )


def _family(r: dict[str, Any]) -> str:
    agree = all(v["measured"] == v["table"] for v in r["results"].values())
    accs = ", ".join(f"{m} {v['test_accuracy']:.3f}" for m, v in r["results"].items())
    gaps = ", ".join(f"{m} {g:.1e}" for m, g in r["sg_form_vs_classic_max_abs_diff"].items())
    verdict = "agree with" if agree else "DIFFER from"
    return (
        f"Accuracy: {accs}. Measured locking columns {verdict} the table. SG form vs classic rule, max |diff|: {gaps}."
    )


def _stochastic(r: dict[str, Any]) -> str:
    return " ".join(
        f"{name}: " + ", ".join(f"p={p} {a:.3f}" for p, a in accs.items()) + "." for name, accs in r["results"].items()
    )


SUMMARIES = {
    "artificial": _artificial,
    "loss-shape": _loss_shape,
    "curves": _curves,
    "representations": _representations,
    "family": _family,
    "stochastic-updates": _stochastic,
}


def write_report(results: dict[str, dict[str, Any]], out: Path, quick: bool) -> Path:
    size = "quick (CI) size" if quick else "full size"
    lines = [
        f"# dni_dist reproductions ({size})",
        "",
        "Each section: the paper's finding, our figure(s), and what we measured. Numbers are in NAME.json.",
        "",
    ]
    for name, r in results.items():
        lines += [f"## {name}", "", f"**Paper:** {r['finding']}", ""]
        lines += [f"![{name}]({fig})" for fig in r["figures"]]
        lines += ["", f"**Measured:** {SUMMARIES[name](r)}", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
