"""Stage 0's input placement and evaluation in chunks of the batch size."""

from __future__ import annotations

import torch
from conftest import config
from helpers import stages_for, train_steps

from dni_dist.data import batches
from dni_dist.data.device import TrainingSet
from dni_dist.engines.local import LocalEngine


def test_evaluation_in_chunks_gives_the_one_pass_accuracy() -> None:
    stages, data = stages_for("segments=3", "model.batch_norm=false")
    engine = LocalEngine(stages)
    train_steps(engine, data, steps=15)
    whole = engine.predict(data.x_test, batch_size=len(data.x_test))
    chunked = engine.predict(data.x_test, batch_size=64)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    task = data.task
    assert task.correct(chunked, data.y_test) == task.correct(whole, data.y_test)
    assert task.correct(whole, data.y_test) / len(data.y_test) > 0.5  # a trained model, not chance


def test_a_ray_stage_evaluates_in_chunks_of_the_batch_size(monkeypatch) -> None:
    from dni_dist.engines.ray_engine import StageWorker

    cfg = config("segments=2", "model.batch_norm=false", "data.batch_size=50")
    _, data = stages_for("segments=2", "model.batch_norm=false", "data.batch_size=50")
    worker = StageWorker(cfg, 0, data.input_shape, data.task, use_gpu=False)
    sizes = []
    predict = worker.stage.predict
    monkeypatch.setattr(worker.stage, "predict", lambda x: sizes.append(len(x)) or predict(x))
    out = worker.predict(data.x_test)
    assert max(sizes) == 50 and sum(sizes) == len(data.x_test)
    torch.testing.assert_close(out, predict(data.x_test), rtol=1e-5, atol=1e-6)


def test_the_training_set_gives_the_batches_of_the_epochs_order() -> None:
    _, data = stages_for()
    placed = TrainingSet(data.x_train, data.y_train, torch.device("cpu"))
    assert placed.resident
    for (x, y), (x2, y2) in zip(placed.batches(64, 3, 1), batches(data.x_train, data.y_train, 64, 3, 1), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
