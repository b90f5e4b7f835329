"""Shared test set-up: one thread, and a tiny Fashion-MNIST in the real IDX format."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: on a small shared CPU, torch's default threads can make a tiny
    step 100x slower whenever another process runs (measured here); tests need no speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file (gzip), as the MNIST family ships: magic, dims, then the uint8 array."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


def make_fashion_mnist(root: Path, n_train: int = 320, n_test: int = 128) -> Path:
    """fashion-mnist under root/fashion-mnist: 28x28 images with a bright band per class (learnable)."""
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c:2 * c + 8, :] += 180
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x.clip(0, 255))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data folder holding a tiny fashion-mnist (320 train / 128 test)."""
    return make_fashion_mnist(tmp_path_factory.mktemp("data"))
