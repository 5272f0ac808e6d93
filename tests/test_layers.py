"""The package's layers stay visible: a module imports only from its own layer or below.

Every import in dni_dist (top-level, inside functions and under TYPE_CHECKING alike) is
read from the source with ``ast`` and checked against the order below, which is the one
``dni_dist/__init__.py`` describes. A new folder must be given a place here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dni_dist

PACKAGE = Path(dni_dist.__file__).parent

# First component below dni_dist -> its layer, bottom (0) to top.
LAYERS: dict[str, int] = {
    "errors": 0,
    "core": 1,
    "models": 2,
    "data": 2,
    "wire": 2,
    "transports": 3,
    "config": 4,
    "builder": 4,
    "engines": 5,
    "operations": 6,
    "runner": 7,
    "api": 7,
    "bench": 8,
    "reproduce": 8,
    "cli": 9,
    "__init__": 9,
    "__main__": 9,
}
# Folders of one layer that must not lean on each other either: the zoo, the datasets and
# the wire format each build on core alone.
SEPARATE = {"models", "data", "wire"}


def _unit(module: str) -> str:
    """'dni_dist.core.stage' -> 'core'; 'dni_dist' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(rel: Path, source: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every dni_dist import in one file of the package."""
    here = "dni_dist." + ".".join(rel.with_suffix("").parts)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, str(rel))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dni_dist"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: -node.level]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.split(".")[0] != "dni_dist":
                continue
            if module == "dni_dist":  # `from dni_dist import checkpoint`: the names are modules
                found += [(node.lineno, f"dni_dist.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _violations(rel: Path, source: str) -> list[str]:
    """The imports of one module (path relative to the package) that run against the layers."""
    unit = rel.parts[0].removesuffix(".py")
    assert unit in LAYERS, f"{rel}: give dni_dist/{unit} a layer in tests/test_layers.py"
    bad = []
    for line, module in _imports(rel, source):
        target = _unit(module)
        if target == unit:
            continue
        assert target in LAYERS, f"{rel}:{line} imports {module}, which has no layer"
        if LAYERS[target] > LAYERS[unit] or (unit in SEPARATE and target in SEPARATE):
            where = f"dni_dist/{rel}:{line} ({unit}, layer {LAYERS[unit]})"
            bad.append(f"{where} imports {module} (layer {LAYERS[target]})")
    return bad


def test_no_module_imports_a_higher_layer() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    bad = [v for path in files for v in _violations(path.relative_to(PACKAGE), path.read_text())]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_root_holds_only_the_surfaces() -> None:
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= 8, root_modules


def test_the_checker_sees_upward_and_sideways_imports() -> None:
    """The check is only worth something if it fires."""
    late_upward = "def f():\n    from dni_dist.engines.local import LocalEngine\n    return LocalEngine\n"
    assert _violations(Path("core/x.py"), late_upward) == [
        "dni_dist/core/x.py:2 (core, layer 1) imports dni_dist.engines.local (layer 5)"
    ]
    assert _violations(Path("wire/x.py"), "from dni_dist.data import batches\n")
    assert _violations(Path("transports/x.py"), "from .. import config\n")
    assert not _violations(Path("engines/x.py"), "from dni_dist.core.stage import Stage\nfrom . import local\n")
