"""User code: model and data factories, their one-line errors, and ``dni_dist.fit`` on the
local engine (the Ray engine: test_factories_ray.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import config
from helpers import write_module

import dni_dist
from dni_dist.builder import load_data, plan_model
from dni_dist.cli import main
from dni_dist.errors import ConfigError
from dni_dist.operations.preflight import preflight
from examples.factories import blobs

EXAMPLE_YAML = Path(__file__).parent.parent / "examples" / "factory.yaml"

# A module of broken factories, written for each test under a unique name (no import cache).
BAD = """
import torch
from torch import nn

NOT_CALLABLE = 3

def returns_dict(input_shape, n_outputs):
    return {"layer": nn.Linear(16, n_outputs)}

def mismatched(input_shape, n_outputs):
    return [nn.Linear(16, 32), nn.ReLU(), nn.Linear(64, n_outputs)]

def wrong_outputs(input_shape, n_outputs):
    return nn.Sequential(nn.Linear(16, n_outputs + 1))

def raises(input_shape, n_outputs):
    raise ValueError("no GPU here")

def good(input_shape, n_outputs):
    return nn.Sequential(nn.Linear(16, 8), nn.Linear(8, n_outputs))

def _data(**changes):
    g = torch.Generator().manual_seed(0)
    d = {"x_train": torch.randn(40, 16, generator=g), "y_train": torch.arange(40) % 4,
         "x_test": torch.randn(8, 16, generator=g), "y_test": torch.arange(8) % 4}
    d.update(changes)
    return d

def float_labels():
    return _data(y_train=torch.rand(40), task="classification")

def out_of_range():
    return _data(y_test=torch.full((8,), 7), n_classes=4)

def length_mismatch():
    return _data(y_train=torch.zeros(39, dtype=torch.long))

def integer_inputs():
    return _data(x_train=torch.zeros(40, 16, dtype=torch.uint8))

def three_items():
    return (torch.zeros(4, 16), torch.zeros(4), torch.zeros(4, 16))
"""


@pytest.fixture
def bad(tmp_path, monkeypatch) -> str:
    return write_module(tmp_path, monkeypatch, "bad_factories", BAD)


def _error(*overrides: str) -> str:
    cfg = config(*overrides)
    with pytest.raises(ConfigError) as caught:
        preflight(cfg)
    message = str(caught.value)
    assert "\n" not in message
    return message


DATA = "data.factory=examples.factories:blobs"


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("NOT_CALLABLE", "is not callable (type int)"),
        ("returns_dict", "returned a dict; return an nn.Sequential"),
        ("mismatched", "block 2 (Linear) does not take block 1's output of shape (32,)"),
        ("wrong_outputs", "outputs shape (5,) per example; the task needs (4,)"),
        ("raises", "raised ValueError: no GPU here"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_a_bad_model_factory_is_named_in_one_line(bad, function, expected) -> None:
    message = _error(f"model.factory={bad}:{function}", DATA)
    assert f"model.factory='{bad}:{function}'" in message
    assert expected in message


def test_a_module_that_cannot_be_imported_is_named() -> None:
    message = _error("model.factory=no_such_package.nets:mlp", DATA)
    assert "no module named 'no_such_package'" in message and "PYTHONPATH" in message
    message = _error("data.factory=no_such_package:load")
    assert message.startswith("data.factory='no_such_package:load'")


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("float_labels", "y_train has dtype torch.float32; classification needs integer class labels"),
        ("out_of_range", "class label 7 is out of range for n_classes=4"),
        ("length_mismatch", "y_train has 39 labels for 40 inputs in x_train"),
        ("integer_inputs", "x_train has dtype torch.uint8; inputs must be floating point"),
        ("three_items", "returned a tuple of 3 items; return (x_train, y_train, x_test, y_test)"),
        ("good", "raised TypeError"),  # a model factory given as data: it needs arguments
    ],
)
def test_bad_data_is_named_in_one_line(bad, function, expected) -> None:
    message = _error(f"data.factory={bad}:{function}")
    assert message.startswith(f"data.factory='{bad}:{function}'")
    assert expected in message


def test_a_spec_must_name_module_and_function() -> None:
    with pytest.raises(ConfigError, match=r"model.factory='examples/factories.py' must look like"):
        config("model.factory=examples/factories.py")


def test_kwargs_merge_across_yaml_and_set_and_need_a_factory(tmp_path) -> None:
    cfg = dni_dist.load_config(str(EXAMPLE_YAML), ["model.kwargs.width=8", "data.kwargs.classes=3"])
    assert cfg.model.kwargs == {"width": 8, "depth": 3}
    assert cfg.data.kwargs == {"samples": 1200, "classes": 3}
    with pytest.raises(ConfigError, match=r"model.kwargs=\{'width': 8\} needs model.factory"):
        config("model.kwargs.width=8")
    with pytest.raises(ConfigError, match="is not a keyword argument name"):
        config("model.factory=examples.factories:mlp", "model.kwargs={1: 2}")
    with pytest.raises(ConfigError, match=r"model.kwargs.day=datetime.date\(2020, 1, 1\) must be plain data"):
        config("model.factory=examples.factories:mlp", "model.kwargs.day=2020-01-01")


def test_factory_data_infers_the_task_and_cuts_follow_blocks() -> None:
    cfg = config("model.factory=examples.factories:mlp", "model.kwargs.depth=4", DATA, "segments=3", "cuts=[2,4]")
    data = load_data(cfg)
    assert (data.task.kind, data.task.n_outputs, data.input_shape) == ("classification", 4, (16,))
    plan = plan_model(cfg, data.input_shape, data.task)
    assert [len(s) for s in plan.segments] == [2, 2, 1]
    balanced = config("model.factory=examples.factories:mlp", DATA, "segments=3")  # balance=cost
    assert sum(len(s) for s in plan_model(balanced, data.input_shape, data.task).segments) == 4


def test_float_targets_make_a_regression_task() -> None:
    from dni_dist.data.factory import as_dataset

    x = torch.randn(10, 3)
    data = as_dataset((x, torch.randn(10), x, torch.randn(10)), name="t", where="data")
    assert (data.task.kind, data.task.n_outputs, tuple(data.y_train.shape)) == ("regression", 1, (10, 1))


def test_fit_learns_on_the_local_engine_and_the_saved_model_round_trips(tmp_path) -> None:
    x_train, y_train, x_test, y_test = blobs(samples=600)
    fitted = dni_dist.fit(
        "examples.factories:mlp",
        (x_train, y_train, x_test, y_test),
        segments=3,
        method="sg",
        epochs=3,
        out=str(tmp_path / "run"),
        model_kwargs={"width": 32},
    )
    accuracy = fitted.summary["test_accuracy"]
    assert accuracy > 0.6  # 4 classes: chance is 0.25
    assert fitted.summary["dataset"] == "in-memory" and fitted.summary["segments"] == 3
    predicted = (fitted.predict(x_test).argmax(1) == y_test).float().mean().item()
    assert predicted == pytest.approx(accuracy, abs=1e-6)
    fitted.save(tmp_path / "model.pt")
    loaded = dni_dist.load_model(tmp_path / "model.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x_test), fitted.predict(x_test))


def test_fit_takes_a_callable_and_a_config_mapping(tmp_path) -> None:
    from examples.factories import mlp

    fitted = dni_dist.fit(
        mlp,
        blobs,
        config={"epochs": 1, "data": {"batch_size": 32}, "method": "fa"},
        data_kwargs={"samples": 300},
        out=str(tmp_path),
    )
    assert fitted.summary["config"]["model"]["factory"] == "examples.factories:mlp"
    assert fitted.summary["config"]["data"]["batch_size"] == 32
    fitted.save(tmp_path / "fa.pt")  # FA layers carry their feedback matrices
    _, _, x_test, _ = blobs(samples=300)
    with torch.no_grad():
        assert torch.equal(dni_dist.load_model(tmp_path / "fa.pt")(x_test), fitted.predict(x_test))


def test_fit_refuses_a_function_without_an_importable_name(tmp_path) -> None:
    with pytest.raises(ConfigError, match="has no importable name"):
        dni_dist.fit(lambda shape, n: None, blobs, out=str(tmp_path))


def test_cli_trains_a_factory_from_a_yaml_file(tmp_path, capsys) -> None:
    settings = yaml.safe_load(EXAMPLE_YAML.read_text())
    settings.update(runtime="local", epochs=2, out=str(tmp_path / "out"))
    path = tmp_path / "factory.yaml"
    path.write_text(yaml.safe_dump(settings))
    assert main(["train", str(path), "--quiet"]) == 0
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    assert summary["dataset"] == "examples.factories:blobs" and summary["test_accuracy"] > 0.6
    assert main(["train", str(path), "--set", "model.factory=examples.factories:nope", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dni-dist: error: model.factory='examples.factories:nope': module 'examples.factories' has no "
                   "attribute 'nope'"]  # fmt: skip


def test_fit_on_ray_refuses_a_factory_from_main(tmp_path, monkeypatch) -> None:
    import __main__
    from examples.factories import mlp

    def tiny(input_shape, n_outputs):  # as if defined in a script run as __main__
        return mlp(input_shape, n_outputs, width=8, depth=1)

    tiny.__module__, tiny.__qualname__ = "__main__", "tiny"
    monkeypatch.setattr(__main__, "tiny", tiny, raising=False)
    with pytest.raises(ConfigError, match=r"model.factory='__main__:tiny' is defined in __main__.*move it to a module"):
        dni_dist.fit(tiny, blobs, runtime="ray", out=str(tmp_path))
