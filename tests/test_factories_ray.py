"""User factories on the Ray engine (embedded Ray, 2 CPUs, K=3): ``dni_dist.fit`` and
``dni-dist train CONFIG.yaml``. One Ray session for the module, as in test_ray_engine.py."""

from __future__ import annotations

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
from examples.factories import blobs

pytestmark = pytest.mark.slow  # Ray actors: about 10 s a run on 2 cores

EXAMPLES = Path(__file__).parent.parent / "examples"
RAY = {"runtime": "ray", "transport": "gloo", "dist": {"cpus_per_stage": 0.5}}


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


def test_fit_on_ray_imports_a_module_only_the_driver_has(tmp_path, monkeypatch) -> None:
    # The package sits in a directory added to this process's sys.path after Ray started:
    # the stage actors find it only through the path the driver records for them.
    package = tmp_path / "user_models_only_here"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(EXAMPLES / "factories.py", package / "nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
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
