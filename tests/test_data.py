from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct

import numpy as np
import pytest
import torch

from dni_dist.data import DATASETS, batches, load_dataset, mnist1d
from dni_dist.data import mnist as mnist_module
from dni_dist.errors import ConfigError


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(directory, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,)),
    }
    for name, array in files.items():
        payload = _idx(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files(tmp_path, gz: bool) -> None:
    _write_mnist(tmp_path, gz=gz)
    data = load_dataset("mnist", seed=0, path=str(tmp_path))
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert data.y_train.dtype == torch.long and int(data.y_train.max()) < 10


def test_mnist_missing_or_corrupt_files_are_named(tmp_path) -> None:
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", seed=0, path=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ConfigError, match="not an IDX file"):
        load_dataset("mnist", seed=0, path=str(tmp_path))


def test_mnist_download_checks_md5(tmp_path, monkeypatch) -> None:
    served: dict[str, bytes] = {}
    for name in mnist_module.MD5:
        served[name] = gzip.compress(_idx(np.zeros((3, 28, 28) if "images" in name else (3,))))
    monkeypatch.setattr(mnist_module, "MD5", {n: hashlib.md5(b).hexdigest() for n, b in served.items()})
    monkeypatch.setattr(
        mnist_module.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served[url.rsplit("/", 1)[1]])
    )
    data = load_dataset("mnist", seed=0, path=str(tmp_path / "new"), download=True)
    assert len(data.x_train) == 3
    monkeypatch.setattr(mnist_module, "MD5", dict.fromkeys(served, "0" * 32))
    with pytest.raises(ConfigError, match="failed its MD5 check"):
        load_dataset("mnist", seed=0, path=str(tmp_path / "other"), download=True)


def test_cifar10_reads_python_batches(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        (tmp_path / name).write_bytes(pickle.dumps(entry))
    data = load_dataset("cifar10", seed=0, path=str(tmp_path))
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"needs data\.path"):
        load_dataset("cifar10", seed=0)


def test_digits_split_is_deterministic_and_disjoint() -> None:
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    assert torch.equal(a.x_test, b.x_test)
    assert len(a.x_train) + len(a.x_test) == 1797
    assert not torch.equal(a.x_test, load_dataset("digits", seed=4).x_test)


@pytest.mark.parametrize("labels", ["separable", "noisy", "random"])
def test_artificial_classification_labelings(labels: str) -> None:
    data = load_dataset("artificial", seed=0, task="classification", dim=100, labels=labels, samples=2000)
    assert data.x_train.shape[1] == 100 and data.task.n_outputs == 1
    from sklearn.linear_model import LogisticRegression

    # separable: a (nearly hard-margin) linear classifier fits every label; noisy: about 90%
    x, y = data.x_train.numpy(), data.y_train.numpy()
    fitted = LogisticRegression(C=1e4, max_iter=5000).fit(x, y).score(x, y)
    if labels == "separable":
        assert fitted == 1.0
    if labels == "noisy":
        assert 0.85 < fitted < 0.99
    if labels == "random":
        assert 0.4 < float(y.mean()) < 0.6
    again = load_dataset("artificial", seed=0, task="classification", dim=100, labels=labels, samples=2000)
    assert torch.equal(data.y_train, again.y_train)


def test_batches_depend_only_on_seed_and_epoch() -> None:
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    first = [b[1].tolist() for b in batches(x, y, 3, seed=1, epoch=0)]
    assert first == [b[1].tolist() for b in batches(x, y, 3, seed=1, epoch=0)]
    assert first != [b[1].tolist() for b in batches(x, y, 3, seed=1, epoch=1)]
    assert len(first) == 3  # the incomplete last batch is dropped


def test_mnist1d_is_deterministic_by_seed_with_the_documented_shapes() -> None:
    a, b = mnist1d.make_mnist1d(3, n_train=500, n_test=200), mnist1d.make_mnist1d(3, n_train=500, n_test=200)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, mnist1d.make_mnist1d(4, n_train=500, n_test=200).x_train)
    assert a.x_train.shape == (500, 1, mnist1d.LENGTH) and a.x_test.shape == (200, 1, mnist1d.LENGTH)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.long
    assert a.task.kind == "classification" and a.task.n_outputs == 10
    assert torch.bincount(a.y_train).tolist() == [50] * 10 and torch.bincount(a.y_test).tolist() == [20] * 10
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1.0) < 1e-4


def test_mnist1d_test_set_is_a_separate_draw() -> None:
    small, large = mnist1d.make_mnist1d(0, n_train=300, n_test=100), mnist1d.make_mnist1d(0, n_train=600, n_test=100)
    # The test draws do not depend on the training size: only the standardisation by the
    # training set's mean and std differs, an affine map. And no test signal is a training one.
    pair = torch.stack([small.x_test.flatten(), large.x_test.flatten()])
    assert float(torch.corrcoef(pair)[0, 1]) > 1 - 1e-6
    distances = torch.cdist(large.x_test.flatten(1), large.x_train.flatten(1))
    assert float(distances.min()) > 1e-3


def test_mnist1d_via_load_dataset_and_config() -> None:
    from dni_dist.config import load_config

    config = load_config(overrides=["data.name=mnist1d"])
    assert config.data.name == "mnist1d" and "mnist1d" in DATASETS
    with pytest.raises(ConfigError, match=r"data\.name='mnist-1d' is unknown.*mnist1d"):
        load_config(overrides=["data.name=mnist-1d"])
    with pytest.raises(ConfigError, match="n_train=5"):
        mnist1d.make_mnist1d(0, n_train=5)


def test_mnist1d_a_tiny_mlp_learns_well_above_chance() -> None:
    torch.manual_seed(0)
    data = mnist1d.make_mnist1d(0, n_train=3000, n_test=1000)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(8):
        for x, y in batches(data.x_train, data.y_train, 64, seed=0, epoch=epoch):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((net(data.x_test).argmax(1) == data.y_test).float().mean())
    assert accuracy > 0.45, accuracy  # chance is 0.1
