"""User code named by a ``"package.module:function"`` spec (``model.factory``, ``data.factory``).

A spec, not a function object, is what the config holds: it is plain data (YAML, ``--set``,
summary.json) and every Ray actor resolves it itself. A module that is not on the path is looked
for in the working directory, as a script's own directory would be. An actor's Python path
is not the driver's, so the driver also records where the module came from
(``import_root``); an actor that cannot find the module on its own path looks there
(``resolve`` with ``fallback_paths``), which is what makes a module beside a script or
notebook work on an embedded Ray. On a cluster the module travels with the job (``ray job submit --working-dir``
or ``runtime_env={"py_modules": [...]}``) and is found first.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dni_dist.errors import ConfigError

_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def check_spec(key: str, spec: str) -> None:
    """The spec's shape only (nothing is imported): config validation calls this."""
    if not _SPEC.fullmatch(spec):
        raise ConfigError(f"{key}={spec!r} must look like 'package.module:function', e.g. examples.factories:mlp")


def resolve(key: str, spec: str, fallback_paths: Sequence[str] = ()) -> Callable[..., Any]:
    """Import the module and return the callable the spec names; ConfigError otherwise."""
    check_spec(key, spec)
    module_name, _, attribute = spec.partition(":")
    module = _import(key, spec, module_name, fallback_paths)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}={spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}={spec!r} is not callable (type {type(target).__name__}); name a function")
    return target


def _import(key: str, spec: str, module_name: str, fallback_paths: Sequence[str]) -> Any:
    top = module_name.split(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing module itself may be retried from the driver's paths; a module that
        # exists but fails inside (a missing dependency of its own) is the user's error.
        if exc.name not in _prefixes(module_name):
            raise ConfigError(f"{key}={spec!r}: importing it failed: {_first_line(exc)}") from None
        # The working directory last: `dni-dist` (a console script) does not put it on the path.
        for path in [*fallback_paths, os.getcwd()]:
            if path not in sys.path and os.path.isdir(path):
                sys.path.append(path)  # appended: what this process found first still wins
                importlib.invalidate_caches()
                try:
                    return importlib.import_module(module_name)
                except ModuleNotFoundError:
                    continue
        raise ConfigError(
            f"{key}={spec!r}: no module named {exc.name!r}; put {top!r} on PYTHONPATH or in the working "
            "directory (on a cluster: ray job submit --working-dir)"
        ) from None
    except Exception as exc:  # the module ran and raised
        raise ConfigError(f"{key}={spec!r}: importing it failed: {_first_line(exc)}") from None


def _prefixes(module_name: str) -> set[str]:
    parts = module_name.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def import_root(spec: str) -> str | None:
    """The directory on this process's path that the spec's module was imported from (its
    top-level package's parent), for processes that do not have it on their path."""
    module_name = spec.partition(":")[0]
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if module is None or file is None or module_name == "__main__":
        return None
    depth = module_name.count(".") + (1 if Path(file).name == "__init__.py" else 0)
    return str(Path(file).resolve().parents[depth])


def spec_of(key: str, function: Callable[..., Any]) -> str:
    """The ``module:qualname`` spec that names ``function``, checked to resolve back to it.
    Lambdas and nested functions have no such name: they cannot reach another process."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ConfigError(
            f"{key}={function!r} has no importable name; define it at the top level of a module "
            "(or pass its 'module:function' spec)"
        )
    spec = f"{module}:{qualname}"
    if resolve(key, spec) is not function:
        raise ConfigError(f"{key}={function!r}: {spec!r} names another object; pass the spec as a string")
    return spec
