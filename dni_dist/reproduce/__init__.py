"""``dni-dist reproduce NAME``: the paper's experiments as figures and numbers.

Each experiment module has ``FINDING`` (the paper's claim in one sentence) and
``run(out, quick) -> dict`` writing ``OUT/NAME.json`` and its PNG figures. They run on the
local engine: the reproductions test the method, not the runtime. The top layer with
``bench``: it may import everything below, and nothing imports it but ``cli``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dni_dist.reproduce import artificial, curves, family, loss_shape, representations, stochastic

EXPERIMENTS: dict[str, Any] = {
    "artificial": artificial,
    "loss-shape": loss_shape,
    "curves": curves,
    "representations": representations,
    "family": family,
    "stochastic-updates": stochastic,
}


def reproduce(
    name: str,
    out: Path,
    quick: bool,
    data_dir: str | None = None,
    progress: Callable[[str], None] | None = None,
    settings: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run one experiment, or ``all`` of them plus ``OUT/report.md``; ``report`` rebuilds
    the report from the JSON files already in OUT (after re-running one experiment).
    ``settings``: config overrides (KEY=VALUE) applied last to every run, e.g. another model."""
    from dni_dist.config import load_config
    from dni_dist.reproduce.common import SETTINGS

    load_config(overrides=list(settings))  # a bad key or value fails before any experiment runs
    token = SETTINGS.set(tuple(settings))
    try:
        return _reproduce(name, out, quick, data_dir, progress)
    finally:
        SETTINGS.reset(token)


def _reproduce(
    name: str, out: Path, quick: bool, data_dir: str | None, progress: Callable[[str], None] | None
) -> dict[str, Any]:
    from dni_dist.errors import ConfigError
    from dni_dist.reproduce.report import write_report

    if name == "report":
        found = {n: out / f"{n}.json" for n in EXPERIMENTS if (out / f"{n}.json").exists()}
        if not found:
            raise ConfigError(f"no experiment results (NAME.json) in {out}; run `dni-dist reproduce all` first")
        results = {n: json.loads(path.read_text()) for n, path in found.items()}
        write_report(results, out, quick=bool(results[next(iter(results))].get("quick", False)))
        return results
    names = list(EXPERIMENTS) if name == "all" else [name]
    if any(n not in EXPERIMENTS for n in names):
        raise ConfigError(f"experiment {name!r} is unknown; use one of {', '.join(EXPERIMENTS)}, all or report")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in names:
        if progress:
            progress(n)
        module = EXPERIMENTS[n]
        results[n] = module.run(out, quick, data_dir) if n == "curves" else module.run(out, quick)
    if name == "all":
        write_report(results, out, quick)
    return results
