"""``dni-dist bench NAME``: DNI against the backprop a user would otherwise pick, measured
side by side in one run. Each benchmark is a module ``dni_dist.bench.<NAME>`` with
``run(out: Path, quick: bool, segments: list[int], **opts) -> dict``, imported only when
asked for (they pull in Ray and matplotlib). The top layer with ``reproduce``: it may import
everything below (engines, runner, builder, core, ...), and nothing imports it but ``cli``."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from dni_dist.errors import ConfigError

BENCHES: dict[str, str] = {
    "throughput": "throughput",
    "accuracy": "accuracy",
    "links": "links",
    "scale": "scale",
    "overhead": "overhead",
}


def run_bench(name: str, out: Path, quick: bool, segments: list[int], **opts: Any) -> dict[str, Any]:
    if name not in BENCHES:
        raise ConfigError(f"bench {name!r} is unknown; use one of {', '.join(BENCHES)}")
    module_name = f"dni_dist.bench.{BENCHES[name]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # a missing dependency inside the benchmark: not ours to hide
            raise
        raise ConfigError(f"bench {name!r} is not available in this install ({module_name} is missing)") from None
    given = {k: v for k, v in opts.items() if v is not None}
    params = inspect.signature(module.run).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unused = [k for k in given if not takes_any and k not in params]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ConfigError(f"bench {name} does not take {flags}")
    return module.run(out, quick, segments, **given)
