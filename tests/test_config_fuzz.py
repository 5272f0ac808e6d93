"""Fuzz the whole input surface of ``dni-dist train --check``: ``--set`` overrides, YAML
config files and raw flags. Whatever comes in, the CLI answers with exit 0 ("config ok"
and a plan) or exit 2 and exactly one ``dni-dist: error:`` line; never a traceback."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dni_dist import cli
from dni_dist.config import _CHOICES, _RANGES, TrainConfig


def _leaf_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        keys += _leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [f"{prefix}{f.name}"]
    return keys


def eval_default(key: str) -> Any:
    value: Any = TrainConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


# data.download=true would fetch MNIST from the internet: not a config check.
FIELDS = [k for k in _leaf_keys(TrainConfig()) if k != "data.download"]
BOOLS = {k for k in FIELDS if isinstance(eval_default(k), bool)}
SECTIONS = [f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory)]
JUNK_KEYS = ["", ".", "model.", ".seed", "sg.colour", "dist.dist", "Model.kind", "model.kind.x", "seed.seed", "a b"]
ODDITIES = [
    "[", "]", "{", "{a: 1}", "[1, 2]", "[2, 1]", "[0]", "[]", "~", "null", "yes", "no", "on", "off", "true", "True",
    ".nan", ".inf", "-.inf", "nan", "1e400", "-1e400", "1e-4", "0x1F", "0o17", "1_000", "2020-01-01", "12:30:00",
    "'", '"', "&a 1", "*a", "- 1", "a: b", "", " ", "!!binary AAAA", "!!python/object:os.system", "%", "@", "`",
    "-1", "0", "1", "2", "3", "65536", "0.5", "1.5", "-0.0", "10" * 50, "a\tb", "/", "/no/such/dir", "runs/x",
    "README.md", "README.md/x", "x" * 5000, "mnist", "cifar10", "artificial", "cnn", "conv", "ray", "nccl", "grpc",
]  # fmt: skip
FLAGS = [
    "--method", "--segments", "--runtime", "--transport", "--address", "--schedule", "--dataset", "--data-dir",
    "--epochs", "--seed", "--out", "--metrics-port", "--progress", "--checkpoint-dir", "--checkpoint-every",
]  # fmt: skip
SWITCHES = ["--resume", "--quiet", "--check", "--", "-", "--bogus", "-x", "--set", "--segments=3", "--method=dfa"]


def _plausible(key: str) -> st.SearchStrategy[str]:
    """Values that pass the field's own check, so examples reach the cross-field and plan checks."""
    if key in _CHOICES:
        return st.sampled_from(_CHOICES[key])
    if key in _RANGES:
        low, high = _RANGES[key]
        low = int(low or 0) if isinstance(low, int) or low is None else low
        top = low + 64 if high is None else min(high, low + 64)
        if isinstance(low, float) or isinstance(top, float):
            return st.floats(float(low), float(top)).map(repr)
        return st.integers(low, top).map(str)
    if key in BOOLS:
        return st.sampled_from(["true", "false"])
    if key == "cuts":
        return st.lists(st.integers(0, 6), max_size=4).map(str)
    return st.sampled_from(["runs/fuzz", "/no/such/dir", "0.0.0.0", "localhost:6379", "DNI_TOKEN", "~"])


NUMBERS = st.one_of(
    st.integers().map(str),
    st.integers(-(2**80), 2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
TEXT = st.text(max_size=12)
VALUES = st.one_of(NUMBERS, TEXT, st.sampled_from(ODDITIES))


@st.composite
def overrides(draw: st.DrawFn) -> list[str]:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        # Mostly real keys with values their own check accepts, so most examples get past the
        # field checks into the cross-field checks and the plan.
        key = draw(st.sampled_from(JUNK_KEYS) if draw(st.integers(0, 7)) == 0 else st.sampled_from(FIELDS))
        value = draw(VALUES if draw(st.integers(0, 3)) == 0 else _plausible(key))
        out.append(f"{key}={value}" if draw(st.integers(0, 15)) else key)  # sometimes no '=' at all
    return out


YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT, st.sampled_from(ODDITIES))
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS + SECTIONS), TEXT), inner, max_size=3),
    ),
    max_leaves=8,
)


@st.composite
def config_files(draw: st.DrawFn) -> str:
    """Text of a YAML file: a plausible mapping, any YAML document, or raw text."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        mapping: dict[str, Any] = {}
        for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
            section = mapping
            *parents, leaf = key.split(".")
            for p in parents:
                section = section.setdefault(p, {}) if isinstance(section.get(p, {}), dict) else section
            section[leaf] = yaml.safe_load(draw(_plausible(key))) if draw(st.booleans()) else draw(YAML_SCALARS)
        return yaml.safe_dump(mapping)
    if kind == 1:
        return yaml.safe_dump(draw(YAML_VALUES))
    return draw(st.one_of(st.text(max_size=40), st.sampled_from(ODDITIES)))


@st.composite
def raw_args(draw: st.DrawFn) -> list[str]:
    args: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            args.append(draw(st.sampled_from(SWITCHES)))
        elif choice == 1:
            args += ["--set", draw(overrides().filter(bool))[0]]
        else:
            args += [draw(st.sampled_from(FLAGS)), draw(st.one_of(st.sampled_from(ODDITIES), VALUES))]
    return args


@pytest.fixture(autouse=True, scope="module")
def _digits_once():
    """Every example that passes the config loads digits: read sklearn's CSV once."""
    import sklearn.datasets

    original = sklearn.datasets.load_digits
    sklearn.datasets.load_digits = functools.cache(original)
    yield
    sklearn.datasets.load_digits = original


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()  # examples share the fixture: drop what earlier ones printed
    code = cli.main(["train", "--check", *argv])
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, code, captured.err)
    if code == 0:
        assert captured.out.startswith("config ok\nplan: "), (argv, captured.out)
        assert captured.err == "", (argv, captured.err)
    else:
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("dni-dist: error: "), (argv, captured.err)
        assert captured.err.endswith("\n") and captured.out == "", (argv, captured)


FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@FUZZ
@given(sets=overrides())
def test_set_overrides_exit_0_or_one_error_line(sets: list[str], capsys) -> None:
    _run([arg for s in sets for arg in ("--set", s)], capsys)


@FUZZ
@given(text=config_files(), sets=overrides())
def test_yaml_files_exit_0_or_one_error_line(text: str, sets: list[str], tmp_path_factory, capsys) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "run.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _run([str(path), *(arg for s in sets for arg in ("--set", s))], capsys)


@FUZZ
@given(args=raw_args())
def test_raw_flags_exit_0_or_one_error_line(args: list[str], capsys) -> None:
    _run(args, capsys)


def test_check_plans_without_training(tmp_path, capsys) -> None:
    out = tmp_path / "never"
    assert cli.main(["train", "--check", "--segments", "3", "--out", str(out), "--set", "model.kind=cnn"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "config ok" and printed[2] == "memory per stage (estimate):" and len(printed) == 6
    assert "cnn of 4 blocks in 3 segments" in printed[1] and "cut shapes [" in printed[1]
    assert not out.exists()  # --check writes nothing


@pytest.mark.parametrize(
    ("args", "named"),
    [
        # balance=cost moves the cut off the flatten instead (tests/test_balance.py).
        (
            ["--set", "model.kind=cnn", "--set", "sg.kind=conv", "--segments", "3", "--set", "balance=params"],
            "sg.kind='conv'",
        ),
        (["--set", "model.kind=mlp", "--set", "sg.kind=conv"], "sg.kind='conv'"),
        (["--dataset", "artificial", "--set", "model.kind=cnn"], "model.kind='cnn' needs image inputs"),
        (["--segments", "3", "--set", "cuts=[1,9]"], "cuts=[1, 9]"),
        (["--segments", "3", "--set", "cuts=[2,2]"], "cuts=[2, 2]"),
        (["--segments", "9"], "segments=9"),
        (["--set", "data.batch_size=5000"], "data.batch_size=5000"),
        (["--set", "sg.kind=lowrank", "--set", "sg.rank=100000"], "sg.rank=100000"),
        (["--set", "sg.lr=.nan"], "sg.lr=nan"),
        (["--set", "seed=-1"], "seed=-1"),
        (["--set", "dist.slow_stage=2"], "dist.slow_stage=2"),
        (["--set", "dist.grpc_token_env=no way"], "dist.grpc_token_env='no way'"),
        (["--runtime", "ray", "--transport", "nccl", "--segments", "64", "--set", "model.depth=70"], "transport=nccl"),
        (["--set", r'out="a\nb"'], r"out='a\nb'"),
    ],
)
def test_cross_field_problems_are_caught_by_check(args: list[str], named: str, capsys) -> None:
    assert cli.main(["train", "--check", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dni-dist: error:") and named in err, err
