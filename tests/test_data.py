from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct

import numpy as np
import pytest
import torch

from dni_dist.data import batches, load_dataset
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
