"""MNIST from IDX files in a directory, with an opt-in, checksummed download."""

from __future__ import annotations

import gzip
import hashlib
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch

from dni_dist.core.tasks import Task
from dni_dist.data.base import Dataset
from dni_dist.errors import ConfigError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the gzipped files as published; a download that does not match is discarded.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0x0000TTDD, DD big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path} is not an IDX file (bad magic number); re-download it")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: header says {dims}, found {array.size} values")
    return array.reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def download(directory: Path) -> None:
    """Fetch the four gzipped files into ``directory``, checking each MD5."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, md5 in MD5.items():
        target = directory / name
        if target.exists() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        with urllib.request.urlopen(MIRROR + name, timeout=60) as response:
            payload = response.read()
        if hashlib.md5(payload).hexdigest() != md5:
            raise ConfigError(f"downloaded {name} failed its MD5 check; try again or place the files by hand")
        tmp = target.with_suffix(".part")
        tmp.write_bytes(payload)
        tmp.replace(target)


def load_mnist(path: str | None, download_missing: bool = False) -> Dataset:
    if not path:
        raise ConfigError("dataset 'mnist' needs data.path=DIR holding the four IDX files (or add data.download=true)")
    directory = Path(path)
    if download_missing:
        download(directory)
    if not directory.is_dir():
        raise ConfigError(
            f"data.path={path!r} is not a directory; point it at the MNIST IDX files or set data.download=true"
        )
    found = {key: _find(directory, stem) for key, stem in FILES.items()}
    missing = [FILES[k] for k, v in found.items() if v is None]
    if missing:
        raise ConfigError(
            f"data.path={path!r} lacks {', '.join(missing)} (.gz accepted); set data.download=true to fetch them"
        )
    arrays = {key: read_idx(p) for key, p in found.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        return (torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0 - 0.1307) / 0.3081

    return Dataset(
        "mnist",
        images(arrays["train_images"]),
        torch.tensor(arrays["train_labels"], dtype=torch.long),
        images(arrays["test_images"]),
        torch.tensor(arrays["test_labels"], dtype=torch.long),
        Task("classification", 10),
    )
