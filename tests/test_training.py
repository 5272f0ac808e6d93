"""The foundation issue's acceptance figures, as tests (digits trains in about a second)."""

from __future__ import annotations

import pytest
import torch
from conftest import config

from dni_dist.builder import build_stages, load_data
from dni_dist.core.methods import METHODS
from dni_dist.data import batches
from dni_dist.engines.local import LocalEngine
from dni_dist.runner import train


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    out = tmp_path_factory.mktemp("methods")
    return {m: train(config(f"method={m}", f"out={out / m}"))["test_accuracy"] for m in METHODS}


def test_default_run_reaches_093_on_digits(tmp_path) -> None:
    summary = train(config(f"out={tmp_path}"))
    assert (summary["method"], summary["segments"], summary["runtime"]) == ("sg", 2, "local")
    assert summary["config"]["sg"]["conditioned"] is True
    assert summary["test_accuracy"] >= 0.93


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_digits_above_080(accuracies: dict[str, float], method: str) -> None:
    assert accuracies[method] > 0.80


def test_backprop_reaches_095_and_conditioned_sg_is_within_two_points(accuracies: dict[str, float]) -> None:
    assert accuracies["backprop"] >= 0.95
    assert accuracies["sg"] >= accuracies["backprop"] - 0.02


def _final_train_loss(method: str) -> tuple[float, float]:
    """Deep linear net on noisy linear regression (MSE); returns (loss, least-squares optimum)."""
    cfg = config(
        f"method={method}",
        "data.name=artificial",
        "data.task=regression",
        "data.labels=noisy",
        "data.dim=10",
        "data.outputs=2",
        "data.samples=500",
        "data.batch_size=400",
        "model.kind=deep_linear",
        "model.depth=3",
        "model.width=16",
        "epochs=500",
    )
    data = load_data(cfg)
    engine = LocalEngine(build_stages(cfg, data.input_shape, data.task))
    for epoch in range(cfg.epochs):
        for x, y in batches(data.x_train, data.y_train, cfg.data.batch_size, cfg.seed, epoch):
            engine.train_step(x, y)
    loss = float(data.task.loss(engine.predict(data.x_train), data.y_train))
    design = torch.cat([data.x_train, torch.ones(len(data.x_train), 1)], 1).double()
    target = data.y_train.double()
    solution = torch.linalg.lstsq(design, target).solution
    optimum = float(0.5 * (design @ solution - target).pow(2).sum(1).mean())
    return loss, optimum


def test_deep_linear_mse_linear_sg_reaches_backprops_optimum() -> None:
    sg_loss, optimum = _final_train_loss("sg")
    bp_loss, _ = _final_train_loss("backprop")
    assert (bp_loss - optimum) / optimum < 1e-4
    assert (sg_loss - optimum) / optimum < 1e-3


@pytest.mark.parametrize("loss", ["log", "mse"])
def test_conditioned_sg_trains_binary_artificial_data(tmp_path, loss: str) -> None:
    summary = train(
        config(
            "data.name=artificial",
            "data.dim=100",
            "data.samples=2000",
            f"data.loss={loss}",
            "epochs=5",
            f"out={tmp_path}",
        )
    )
    assert summary["test_accuracy"] > 0.85


@pytest.mark.parametrize("method", ["sg", "fa"])
def test_cnn_with_a_conv_sg_or_conv_feedback_alignment_trains_digits(tmp_path, method: str) -> None:
    summary = train(
        config(
            f"method={method}",
            "model.kind=cnn",
            "model.batch_norm=true",
            "sg.kind=conv",
            "sg.hidden=32",
            "epochs=3",
            f"out={tmp_path}",
        )
    )
    assert summary["stages"][0]["parameters"] == 19008  # the cut sits after the two conv blocks
    assert summary["test_accuracy"] > 0.9
