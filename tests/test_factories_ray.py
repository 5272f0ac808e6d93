"""User factories on the Ray engine (embedded Ray, 2 CPUs, K=3): ``dni_dist.fit`` and
``dni-dist train CONFIG.yaml``. One Ray session for the module, as in test_ray_engine.py."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import ray
import torch
import yaml
from helpers import start_local_ray

import dni_dist
from dni_dist.cli import main
from dni_dist.errors import ConfigError
from examples.factories import blobs

pytestmark = pytest.mark.slow  # Ray actors: about 10 s a run on 2 cores

EXAMPLES = Path(__file__).parent.parent / "examples"
RAY = {"runtime": "ray", "transport": "gloo", "dist": {"cpus_per_stage": 0.5}}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


def _package(tmp_path: Path, monkeypatch, name: str) -> Path:
    """A copy of the example factories as ``name.nets``, in a directory added to this
    process's sys.path after Ray started (so not to the workers')."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(EXAMPLES / "factories.py", package / "nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_fit_on_ray_imports_a_module_only_the_driver_has(tmp_path, monkeypatch) -> None:
    # The stage actors find the package only through the path the driver records for them.
    _package(tmp_path, monkeypatch, "user_models_only_here")
    found = ray.get(ray.remote(lambda: __import__("importlib.util").util.find_spec("user_models_only_here")).remote())
    assert found is None  # not on the workers' own path

    x_train, y_train, x_test, y_test = blobs(samples=600)
    fitted = dni_dist.fit(
        "user_models_only_here.nets:mlp",
        (x_train, y_train, x_test, y_test),  # in memory: shipped to stage 0
        segments=3,
        method="sg",
        epochs=3,
        out=str(tmp_path / "run"),
        model_kwargs={"width": 32},
        **RAY,
    )
    summary = fitted.summary
    assert summary["runtime"] == "ray" and len(summary["stages"]) == 3
    assert summary["test_accuracy"] > 0.6  # 4 classes: chance is 0.25
    predicted = (fitted.predict(x_test).argmax(1) == y_test).float().mean().item()
    assert predicted == pytest.approx(summary["test_accuracy"], abs=1e-6)  # the actors' weights, reassembled
    fitted.save(tmp_path / "model.pt")
    with torch.no_grad():
        assert torch.equal(dni_dist.load_model(tmp_path / "model.pt")(x_test), fitted.predict(x_test))


def test_a_stage_that_cannot_import_the_model_says_so_in_one_line(tmp_path, monkeypatch) -> None:
    # As on a cluster node the module was not shipped to: the driver has it, the actors do not.
    package = _package(tmp_path, monkeypatch, "user_models_not_shipped")
    importlib.import_module("user_models_not_shipped.nets")
    shutil.rmtree(package)
    with pytest.raises(ConfigError) as caught:
        dni_dist.fit("user_models_not_shipped.nets:mlp", blobs(samples=200), segments=2, out=str(tmp_path), **RAY)
    message = str(caught.value)
    assert message.startswith("stage 0 on ") and "\n" not in message
    assert "no module named 'user_models_not_shipped'" in message and "--working-dir" in message


def test_cli_trains_the_example_yaml_on_ray(tmp_path) -> None:
    settings = yaml.safe_load((EXAMPLES / "factory.yaml").read_text())
    assert settings["runtime"] == "ray" and settings["segments"] == 3
    settings.update(epochs=3, out=str(tmp_path / "out"), dist={"cpus_per_stage": 0.5})
    path = tmp_path / "factory.yaml"
    path.write_text(yaml.safe_dump(settings))
    assert main(["train", str(path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dataset"] == "examples.factories:blobs" and summary["runtime"] == "ray"
    assert summary["test_accuracy"] > 0.6


def test_lockstep_on_ray_matches_the_local_engine_for_factories(tmp_path) -> None:
    """Actors build the factory's model and get the factory's data exactly as the local engine does."""
    common = {"segments": 3, "epochs": 1, "model_kwargs": {"width": 16}, "data_kwargs": {"samples": 400}}
    spec = ("examples.factories:mlp", "examples.factories:blobs")
    lockstep = {**RAY, "dist": {**RAY["dist"], "schedule": "lockstep"}}
    distributed = dni_dist.fit(*spec, **common, **lockstep, out=str(tmp_path / "ray")).network.state_dict()
    local = dni_dist.fit(*spec, **common, out=str(tmp_path / "local")).network.state_dict()
    assert distributed.keys() == local.keys()
    for name in local:
        torch.testing.assert_close(distributed[name], local[name], msg=name)
