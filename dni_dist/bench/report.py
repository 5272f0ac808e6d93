"""Writing a benchmark's results: JSON (the record), a markdown table, a bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    tmp.replace(path)


def setup_lines(setup: dict[str, Any]) -> list[str]:
    m = setup["machine"]
    lines = [
        f"- command: `{m['command']}`",
        f"- model: {setup['model']}, batch {setup['batch_size']}, {setup['optimizer']}, seed {setup['seed']}",
        f"- data: {' '.join(setup['data'])}",
        f"- CPUs: {setup['cpus_per_stage']:g} per actor; backprop-1core gets one actor's, backprop-1dev K x that "
        f"as one process's threads; gpipe/1f1b: {setup['micro_batches']} micro-batches",
        f"- settings for every method: {' '.join(setup.get('settings') or []) or 'none'}",
        f"- machine: {m['cpu_count']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}, {m['device']}; "
        f"{m['date']}",
    ]
    if m["oversubscribed"]:
        lines.append("- WARNING: the actors were given more CPUs than the machine has; the numbers mean little.")
    return lines


def bar_chart(path: Path, groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    """Grouped bars: one group per x label (method), one bar per series (K); None = no bar."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or on a cluster
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.0))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
