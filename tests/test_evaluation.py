"""Stage 0's input placement and evaluation in chunks of the batch size."""

from __future__ import annotations

import pytest
import torch
from conftest import config
from helpers import stages_for, train_steps

from dni_dist.core.host_sync import count_host_syncs
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


@pytest.mark.parametrize("placement", ["auto", "device", "host"])
def test_on_a_cpu_every_placement_is_plain_indexing_of_the_epochs_order(placement: str) -> None:
    """No pinning without CUDA: the batches are bit for bit the device-resident path's."""
    _, data = stages_for()
    placed = TrainingSet(data.x_train, data.y_train, torch.device("cpu"), placement)
    assert placed.resident and placed.x is data.x_train  # no copy of the set
    with count_host_syncs() as counts:
        got = list(placed.batches(64, 3, 1))
    assert not any(counts.values())
    expected = list(batches(data.x_train, data.y_train, 64, 3, 1))
    assert len(got) == len(expected) == len(data.x_train) // 64
    for (x, y), (x2, y2) in zip(got, expected, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and not x.is_pinned()


def test_a_chunk_of_an_epoch_is_the_same_slice_of_its_order() -> None:
    """A Ray stage runs an epoch in chunks (``offset``, ``steps``): each chunk gets exactly
    its batches of the epoch's order."""
    _, data = stages_for()
    placed = TrainingSet(data.x_train, data.y_train, torch.device("cpu"))
    whole = list(placed.batches(64, 0, 2))
    chunk = list(placed.batches(64, 0, 2, 5, 9))
    assert len(chunk) == 4
    for (x, y), (x2, y2) in zip(chunk, whole[5:9], strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="placement='disk'"):
        TrainingSet(torch.zeros(4, 2), torch.zeros(4), torch.device("cpu"), "disk")
