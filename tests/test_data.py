"""Tests of netslim.data: readers of the real file formats (tiny files written here),
where data is looked for, downloads from a local server, augmentation and the loader."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from netslim import data as D
from netslim.errors import ConfigError, DatasetError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_places(tmp_path, monkeypatch):
    """No test sees the user's data: empty cache, no $NETSLIM_DATA, no mirror, and a
    system folder under tmp_path (tests that want the real one ask for it)."""
    monkeypatch.delenv("NETSLIM_DATA", raising=False)
    monkeypatch.delenv("NETSLIM_MIRROR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", tmp_path / "system")


# ------------------------------------------------------------------ file writers

def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0 0 8 ndim, big-endian dims, the data."""
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_set(folder: Path, n_train=6, n_test=3, gz=True, seed=0, num_classes=10):
    """Write the four (Fashion-)MNIST files; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, num_classes, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, num_classes, n_test, dtype=np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(idx_bytes(arr)))
        else:
            (folder / name).write_bytes(idx_bytes(arr))
    return arrays


class Py2Pickler(pickle._Pickler):
    """Pickles the way Python 2's cPickle wrote the CIFAR batches: protocol 2, strings as
    (SHORT_)BINSTRING (bytes when read with encoding='bytes'), numpy globals under numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_str(self, obj):  # a Python 2 str is a byte string
        self.save_bytes(obj.encode("latin-1"))

    dispatch[str] = save_str

    def save_global(self, obj, name=None):
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def cifar_arrays(n_per_batch: int, batches: list[str], num_classes: int, seed=0):
    rng = np.random.default_rng(seed)
    return {b: (rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                rng.integers(0, num_classes, n_per_batch).tolist()) for b in batches}


def write_cifar(folder: Path, which: str, as_tar: bool, n=4, seed=0):
    """Official layout: cifar-10-batches-py/{data_batch_1..5,test_batch} or
    cifar-100-python/{train,test}, as a folder or inside the .tar.gz."""
    c = D._CIFAR[which]
    names = c["train"] + c["test"]
    arrays = cifar_arrays(n, names, 10 if which == "cifar10" else 100, seed)
    blobs = {}
    for b, (x, y) in arrays.items():
        d = {b"batch_label": b"batch " + b.encode(), b"data": x, b"filenames": [b"img%d.png" % i for i in range(n)]}
        if which == "cifar10":
            d[b"labels"] = y
        else:
            d[b"fine_labels"] = y
            d[b"coarse_labels"] = [v // 5 for v in y]
        blobs[b] = py2_pickle(d)
    folder.mkdir(parents=True, exist_ok=True)
    if as_tar:
        with tarfile.open(folder / c["tar"], "w:gz") as tar:
            for b, blob in blobs.items():
                info = tarfile.TarInfo(f"{c['folder']}/{b}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (folder / c["folder"]).mkdir(exist_ok=True)
        for b, blob in blobs.items():
            (folder / c["folder"] / b).write_bytes(blob)
    return arrays


def write_svhn(folder: Path, n_train=5, n_test=4, seed=0):
    import scipy.io
    rng = np.random.default_rng(seed)
    out = {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)      # the real layout: H, W, C, N
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)               # 1..10, 10 meaning digit 0
        y[0, 0] = 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": X, "y": y})
        out[split] = (X, y)
    return out


def assert_one_line(err: pytest.ExceptionInfo, *parts: str):
    msg = str(err.value)
    assert isinstance(err.value, DatasetError)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, (p, msg)


# ------------------------------------------------------------------------ registry

def test_registry():
    assert D.list_datasets() == ["fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder"]
    s = D.get_spec("cifar100")
    assert (s.in_channels, s.image_size, s.num_classes, s.flip) == (3, 32, 100, True)
    assert not D.get_spec("mnist").flip and not D.get_spec("svhn").flip and D.get_spec("fashion-mnist").flip
    d = json.loads(json.dumps(s.as_dict()))
    assert set(d) == {"name", "in_channels", "image_size", "num_classes", "mean", "std"}
    assert D.DatasetSpec.from_dict(d) == s
    with pytest.raises(ConfigError, match="cifar10.*svhn"):
        D.get_spec("imagenet")
    with pytest.raises(ConfigError, match="imagefolder"):
        D.get_spec("imagefolder")


# ------------------------------------------------------------------------- readers

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_roundtrip(tmp_path, gz, name):
    arrays = write_idx_set(tmp_path / name, gz=gz)
    b = D.load_dataset(name, data_dir=tmp_path)
    assert b.train_x.dtype == torch.uint8 and b.train_x.shape == (6, 1, 32, 32)
    assert b.test_x.shape == (3, 1, 32, 32) and b.train_y.dtype == torch.int64
    # 2-pixel zero border, the image in the middle, untouched
    assert torch.equal(b.train_x[:, 0, 2:30, 2:30], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert b.train_x.sum() == b.train_x[:, :, 2:30, 2:30].sum()
    assert torch.equal(b.test_x[:, 0, 2:30, 2:30], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert b.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert b.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_train_subset(tmp_path):
    arrays = write_idx_set(tmp_path, n_train=6)
    b = D.load_dataset("mnist", data_dir=tmp_path, train_subset=4)
    assert b.train_y.tolist() == arrays["train-labels-idx1-ubyte"][:4].tolist() and len(b.train_x) == 4
    assert len(b.test_y) == 3
    with pytest.raises(ConfigError):
        D.load_dataset("mnist", data_dir=tmp_path, train_subset=0)


@pytest.mark.parametrize("as_tar", [False, True])
@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_roundtrip(tmp_path, which, as_tar):
    arrays = write_cifar(tmp_path, which, as_tar)
    b = D.load_dataset(which, data_dir=tmp_path)
    c = D._CIFAR[which]
    n_train = 4 * len(c["train"])
    assert b.train_x.shape == (n_train, 3, 32, 32) and b.test_x.shape == (4, 3, 32, 32)
    train_data = np.concatenate([arrays[k][0] for k in c["train"]])
    # pixel (c, h, w) of image i is byte c*1024 + h*32 + w of its row
    i, ch, h, w = 5 % n_train, 2, 7, 30
    assert b.train_x[i, ch, h, w].item() == train_data[i, ch * 1024 + h * 32 + w]
    assert torch.equal(b.train_x.reshape(n_train, -1), torch.from_numpy(train_data))
    assert b.train_y.tolist() == sum((arrays[k][1] for k in c["train"]), [])
    assert b.test_y.tolist() == arrays[c["test"][0]][1]
    assert torch.equal(b.test_x.reshape(4, -1), torch.from_numpy(arrays[c["test"][0]][0]))


def test_cifar_extracted_folder_given_directly(tmp_path):
    write_cifar(tmp_path, "cifar10", as_tar=False)
    b = D.load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py")
    assert len(b.train_y) == 20


def test_cifar_unpickler_refuses_other_globals(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar(tmp_path, "cifar100", as_tar=False)
    marker = tmp_path / "pwned"
    # a pickle that would call os.system: must be refused before anything runs
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (folder / "train").write_bytes(evil)
    with pytest.raises(DatasetError) as e:
        D.load_dataset("cifar100", data_dir=tmp_path)
    assert_one_line(e, str(folder / "train"), "refusing global os.system")
    assert not marker.exists()


def test_svhn_roundtrip(tmp_path):
    pytest.importorskip("scipy")
    arrays = write_svhn(tmp_path / "svhn")
    b = D.load_dataset("svhn", data_dir=tmp_path)
    X, y = arrays["train"]
    assert b.train_x.shape == (5, 3, 32, 32) and b.test_x.shape == (4, 3, 32, 32)
    assert torch.equal(b.train_x, torch.from_numpy(X.transpose(3, 2, 0, 1).copy()))
    assert b.train_y[0].item() == 0  # label 10 is digit 0
    assert b.train_y.tolist() == [v % 10 for v in y[:, 0].tolist()]
    assert b.test_y.tolist() == [v % 10 for v in arrays["test"][1][:, 0].tolist()]


def test_svhn_without_scipy(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    write_svhn(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "scipy.io", None)  # import now fails
    with pytest.raises(DatasetError, match="pip install scipy"):
        D.load_dataset("svhn", data_dir=tmp_path)


# ------------------------------------------------------------ corrupt or wrong files

def _corrupt_cases():
    good = idx_bytes(np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8))
    return {
        "bad magic": ("train-images-idx3-ubyte.gz", gzip.compress(b"\x00\x00\x09\x03" + good[4:]), "magic"),
        "truncated gzip": ("train-images-idx3-ubyte.gz", gzip.compress(good)[:2000], "truncated"),
        "not gzip": ("train-images-idx3-ubyte.gz", b"hello, not gzip at all", "truncated or corrupt"),
        "wrong size": ("train-images-idx3-ubyte.gz", gzip.compress(good[:-10]), "needs"),
        "too long": ("train-images-idx3-ubyte.gz", gzip.compress(good + b"x"), "needs"),
        "empty": ("train-labels-idx1-ubyte.gz", gzip.compress(b""), "magic"),
        "label count": ("train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.zeros(5, np.uint8))),
                        "5 labels for 6 images"),
        "label range": ("train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.full(6, 10, np.uint8))),
                        "outside 0..9"),
        "not 28x28": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(np.zeros((6, 30, 30), np.uint8))),
                      "30x30"),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_corrupt_idx(tmp_path, case):
    fname, blob, expect = _corrupt_cases()[case]
    write_idx_set(tmp_path, n_train=6)
    (tmp_path / fname).write_bytes(blob)
    with pytest.raises(DatasetError) as e:
        D.load_dataset("fashion-mnist", data_dir=tmp_path)
    assert_one_line(e, fname, expect)


def test_corrupt_cifar_tar_and_batches(tmp_path):
    write_cifar(tmp_path, "cifar10", as_tar=True)
    tar = tmp_path / "cifar-10-python.tar.gz"
    blob = tar.read_bytes()
    tar.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError) as e:
        D.load_dataset("cifar10", data_dir=tmp_path)
    assert_one_line(e, str(tar))

    folder = tmp_path / "x"
    write_cifar(folder, "cifar10", as_tar=False)
    batch = folder / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:300])  # truncated pickle
    with pytest.raises(DatasetError) as e:
        D.load_dataset("cifar10", data_dir=folder)
    assert_one_line(e, str(batch), "not a readable CIFAR batch")

    # labels out of range, and a count that does not match the images
    x = np.zeros((4, 3072), np.uint8)
    batch.write_bytes(py2_pickle({b"data": x, b"labels": [0, 1, 2, 10]}))
    with pytest.raises(DatasetError) as e:
        D.load_dataset("cifar10", data_dir=folder)
    assert_one_line(e, str(batch), "outside 0..9")
    batch.write_bytes(py2_pickle({b"data": x, b"labels": [0, 1]}))
    with pytest.raises(DatasetError) as e:
        D.load_dataset("cifar10", data_dir=folder)
    assert_one_line(e, str(batch), "2 labels for 4 images")
    batch.write_bytes(py2_pickle({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(DatasetError) as e:
        D.load_dataset("cifar10", data_dir=folder)
    assert_one_line(e, str(batch), "[N, 3072]")


def test_corrupt_svhn(tmp_path):
    pytest.importorskip("scipy")
    write_svhn(tmp_path)
    mat = tmp_path / "test_32x32.mat"
    mat.write_bytes(mat.read_bytes()[:500])
    with pytest.raises(DatasetError) as e:
        D.load_dataset("svhn", data_dir=tmp_path)
    assert_one_line(e, str(mat))


# ------------------------------------------------------------- where data is found

def _labels_of(b: D.DataBundle) -> list[int]:
    return b.train_y.tolist()


def test_search_order(tmp_path, monkeypatch):
    env, cache, system = tmp_path / "env", tmp_path / "xdg-cache" / "netslim", tmp_path / "system"
    marks = {root: write_idx_set(root / "mnist", seed=i)["train-labels-idx1-ubyte"].tolist()
             for i, root in enumerate([env, cache, system])}
    assert len({tuple(v) for v in marks.values()}) == 3
    monkeypatch.setenv("NETSLIM_DATA", str(env))
    assert D.find_dataset("mnist") == env / "mnist"
    assert _labels_of(D.load_dataset("mnist")) == marks[env]
    monkeypatch.delenv("NETSLIM_DATA")
    assert _labels_of(D.load_dataset("mnist")) == marks[cache]
    (cache / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()  # an incomplete set is passed over
    assert _labels_of(D.load_dataset("mnist")) == marks[system]
    assert D.search_locations("mnist") == [cache / "mnist", system / "mnist"]


def test_data_dir_never_falls_back(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "env" / "mnist")
    monkeypatch.setenv("NETSLIM_DATA", str(tmp_path / "env"))
    given = tmp_path / "mine"
    given.mkdir()
    with pytest.raises(DatasetError) as e:
        D.load_dataset("mnist", data_dir=given)
    assert_one_line(e, f"--data-dir {given}", str(given / "mnist"), "--download")
    assert str(tmp_path / "env") not in str(e.value)
    # both layouts of a data_dir work: data_dir/<name>/files and data_dir/files
    write_idx_set(given)
    assert D.find_dataset("mnist", given) == given
    write_idx_set(given / "mnist")
    assert D.find_dataset("mnist", given) == given / "mnist"


def test_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.setenv("NETSLIM_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetError) as e:
        D.load_dataset("fashion-mnist")
    assert_one_line(e, str(tmp_path / "env" / "fashion-mnist"), str(tmp_path / "xdg-cache" / "netslim"),
                    str(tmp_path / "system" / "fashion-mnist"), "apt-get install dataset-fashion-mnist",
                    "--download")
    with pytest.raises(DatasetError) as e:
        D.load_dataset("cifar10")
    assert_one_line(e, "cifar-10-python.tar.gz", "--download")
    assert "apt-get" not in str(e.value)
    # a folder holding part of a set says what it lacks
    write_idx_set(tmp_path / "env" / "mnist")
    (tmp_path / "env" / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as e:
        D.load_dataset("mnist")
    assert_one_line(e, "lacks train-labels-idx1-ubyte.gz")


# ---------------------------------------------------------------------- downloads

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_mirror(tmp_path):
    """A web server on 127.0.0.1 serving tmp_path/mirror; yields (folder, base URL)."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_download_http_then_load(tmp_path, http_mirror, monkeypatch):
    root, url = http_mirror
    arrays = write_idx_set(root / "mnist")
    monkeypatch.setitem(D.DOWNLOADS, "mnist", D.DownloadSource("http://unused.invalid/", _md5s(root / "mnist")))
    monkeypatch.setenv("NETSLIM_MIRROR", url)
    b = D.load_dataset("mnist", download=True)  # not found anywhere -> fetched into the cache
    cached = tmp_path / "xdg-cache" / "netslim" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(_md5s(root / "mnist"))
    assert b.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    # next time it is found without downloading
    monkeypatch.setenv("NETSLIM_MIRROR", "http://127.0.0.1:9/nothing-here")
    assert D.find_dataset("mnist") == cached


def test_download_bad_md5_leaves_nothing(tmp_path, http_mirror):
    root, url = http_mirror
    write_cifar(root / "cifar10", "cifar10", as_tar=True)
    dest = tmp_path / "dest"
    with pytest.raises(DatasetError) as e:
        D.download_dataset("cifar10", dest, mirror=url, md5={"cifar-10-python.tar.gz": "0" * 32})
    assert_one_line(e, "checksum mismatch", "cifar-10-python.tar.gz", "0" * 32)
    assert not dest.exists() or not any(dest.rglob("*.*"))  # no file, no temporary file


def test_download_file_url_into_data_dir(tmp_path):
    mirror = tmp_path / "mirror"
    write_cifar(mirror / "cifar100", "cifar100", as_tar=True)
    good = _md5s(mirror / "cifar100")
    folder = D.download_dataset("cifar100", tmp_path / "data", mirror=mirror.as_uri(), md5=good)
    assert folder == tmp_path / "data" / "cifar100" and _md5s(folder) == good
    assert len(D.load_dataset("cifar100", data_dir=tmp_path / "data").train_y) == 4
    # a missing file on the mirror is one line naming the URL
    with pytest.raises(DatasetError) as e:
        D.download_dataset("svhn", tmp_path / "data", mirror=mirror.as_uri())
    assert_one_line(e, "could not download", "train_32x32.mat")
    assert not (tmp_path / "data" / "svhn").exists() or not any((tmp_path / "data" / "svhn").iterdir())


def test_download_table_is_complete():
    for name, src in D.DOWNLOADS.items():
        assert name in D.DATASETS and src.md5
        assert all(len(m) == 32 and int(m, 16) >= 0 for m in src.md5.values())
    assert D.DOWNLOADS["fashion-mnist"].md5["train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"


# ------------------------------------------------------------------ augmentation

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augment_shapes_and_determinism():
    spec = D.get_spec("cifar10")
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a, b = D.augment(x, spec, _gen(1)), D.augment(x, spec, _gen(1))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, D.augment(x, spec, _gen(2)))
    f = D.augment(x.float(), spec, _gen(1))
    assert f.dtype == torch.float32 and torch.equal(f, a.float())


def test_crop_moves_a_marked_pixel():
    """A single bright pixel at (r, c) lands at (r + p - oy, c + p - ox): the offsets
    recovered from the output must be in 0..2p and vary across the batch."""
    spec = D.DatasetSpec("t", 1, 32, 10, (0.5,), (0.5,), flip=False, crop_pad=4)
    p, B = spec.crop_pad, 256
    x = torch.zeros(B, 1, 32, 32, dtype=torch.uint8)
    x[:, 0, 10, 20] = 255
    out = D.augment(x, spec, _gen(0))
    offsets = set()
    for i in range(B):
        pos = (out[i, 0] == 255).nonzero()
        assert len(pos) == 1 and out[i].sum() == 255  # moved, not duplicated or lost
        r, c = pos[0].tolist()
        oy, ox = 10 + p - r, 20 + p - c
        assert 0 <= oy <= 2 * p and 0 <= ox <= 2 * p
        offsets.add((oy, ox))
    assert len(offsets) > 40  # 81 possible; all per sample
    # pixels pushed past the border are gone (zero padding, not wrap-around)
    x = torch.zeros(B, 1, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = 255
    out = D.augment(x, spec, _gen(0))
    kept = out.flatten(1).sum(1) > 0
    assert 0 < kept.sum() < B


def test_augment_output_is_a_crop_of_the_padded_input():
    """Every output equals some (flipped) 32x32 window of the zero-padded input image,
    checked against a plain per-sample reference; both flip states occur."""
    spec = D.get_spec("cifar10")
    p = spec.crop_pad
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    out = D.augment(x, spec, _gen(7))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    seen_flips = set()
    for i in range(len(x)):
        matches = [(oy, ox, f) for oy in range(2 * p + 1) for ox in range(2 * p + 1) for f in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, oy:oy + 32, ox:ox + 32]))]
        assert matches, i
        seen_flips.update(f for _, _, f in matches)
    assert seen_flips == {False, True}


def test_flip_only_when_spec_says():
    x = torch.zeros(512, 1, 32, 32, dtype=torch.uint8)
    x[:, 0, 16, 8] = 255  # left half
    no_crop = D.DatasetSpec("t", 1, 32, 10, (0.5,), (0.5,), flip=True, crop_pad=0)
    out = D.augment(x, no_crop, _gen(0))
    flipped = out[:, 0, 16, 31 - 8] == 255
    assert torch.equal(flipped, out[:, 0, 16, 8] == 0)
    assert 150 < flipped.sum() < 362  # about half
    out = D.augment(x, D.DatasetSpec("t", 1, 32, 10, (0.5,), (0.5,), flip=False, crop_pad=0), _gen(0))
    assert torch.equal(out, x)
    cols = (D.augment(x, D.get_spec("mnist"), _gen(0)) == 255).nonzero()[:, 3]
    assert cols.max() == 8 + 2 and cols.min() == 8 - 2  # mnist: shifted by up to 2 (its pad), never mirrored


def test_normalize():
    spec = D.get_spec("cifar10")
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    want = (x.float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(D.normalize(x, spec), want)


# ------------------------------------------------------------------------ loader

def _data(n=100, c=1):
    """Random images whose label is their index, so batches say which samples they hold."""
    return torch.randint(0, 256, (n, c, 32, 32), dtype=torch.uint8), torch.arange(n)


def test_loader_test_mode_is_normalize_in_order():
    spec = D.get_spec("fashion-mnist")
    x, y = _data(100)
    loader = D.BatchLoader(x, y, spec, 32, train=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and [len(b[1]) for b in batches] == [32, 32, 32, 4]
    xs = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    torch.testing.assert_close(xs, D.normalize(x, spec))


def test_loader_train_epochs_replay():
    spec = D.get_spec("cifar10")
    x, y = _data(100, 3)
    a = D.BatchLoader(x, y, spec, 16, train=True, seed=3)
    b = D.BatchLoader(x, y, spec, 16, train=True, seed=3)
    assert len(a) == 6  # drop_last by default when training
    a.set_epoch(5)
    b.set_epoch(5)
    ea, eb = list(a), list(b)
    for (xa, ya), (xb, yb) in zip(ea, eb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.float32 and ya.dtype == torch.int64 and xa.shape == (16, 3, 32, 32)
    assert len(set(torch.cat([y for _, y in ea]).tolist())) == 96  # no repeats within an epoch
    a.set_epoch(6)
    e6 = list(a)
    assert not torch.equal(e6[0][1], ea[0][1])
    c = D.BatchLoader(x, y, spec, 16, train=True, seed=4)
    c.set_epoch(5)
    assert not torch.equal(next(iter(c))[1], ea[0][1])
    # augmentation really happens: the batch differs from the plain normalised images
    xa, ya = ea[0]
    assert not torch.allclose(xa, D.normalize(x[ya], spec))


def test_loader_sharding():
    spec = D.get_spec("mnist")
    x, y = _data(103)
    shards = []
    for rank in range(2):
        ld = D.BatchLoader(x, y, spec, 10, train=True, rank=rank, world_size=2, drop_last=False, seed=1)
        ld.set_epoch(2)
        shards.append(torch.cat([yb for _, yb in ld]).tolist())
        assert len(ld) == 6
    assert len(shards[0]) == len(shards[1]) == 52
    assert set(shards[0]) | set(shards[1]) == set(range(103))
    # 103 samples -> 104 slots: the one pad slot repeats the permutation's first sample
    assert len(set(shards[0]) & set(shards[1])) == 1
    assert len(set(shards[0])) == len(set(shards[1])) == 52
    # evaluation: disjoint, every sample exactly once, no padding
    ev = [torch.cat([yb for _, yb in D.BatchLoader(x, y, spec, 10, train=False, rank=r, world_size=2)]).tolist()
          for r in range(2)]
    assert sorted(ev[0] + ev[1]) == list(range(103)) and not set(ev[0]) & set(ev[1])


def test_loader_channels_last_and_errors():
    spec = D.get_spec("cifar10")
    x, y = _data(40, 3)
    xb, _ = next(iter(D.BatchLoader(x, y, spec, 8, train=True, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError):
        D.BatchLoader(x, y, spec, 0, train=True)
    with pytest.raises(ConfigError):
        D.BatchLoader(x, y, spec, 8, train=True, rank=2, world_size=2)
    with pytest.raises(ValueError):
        D.BatchLoader(x.float(), y, spec, 8, train=True)


# -------------------------------------------------------------------- imagefolder

def _write_images(folder: Path, classes: dict[str, int], size=(40, 24), seed=0):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(seed)
    for c, n in classes.items():
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i:03d}.png")


def test_imagefolder_split_and_stats(tmp_path):
    _write_images(tmp_path / "imgs", {"cat": 10, "dog": 10, "eel": 5})
    b = D.load_dataset("imagefolder", data_dir=tmp_path / "imgs", image_size=16, val_split=0.2)
    s = b.spec
    assert (s.name, s.in_channels, s.image_size, s.num_classes) == ("imagefolder", 3, 16, 3)
    assert b.train_x.shape == (20, 3, 16, 16) and b.test_x.shape == (5, 3, 16, 16)
    assert b.test_y.tolist() == [0, 0, 1, 1, 2] and b.train_y.bincount().tolist() == [8, 8, 4]
    px = b.train_x.double() / 255
    assert s.mean == pytest.approx(px.mean((0, 2, 3)).tolist(), abs=1e-4)
    assert s.std == pytest.approx(px.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).tolist(), abs=1e-4)
    again = D.load_dataset("imagefolder", data_dir=tmp_path / "imgs", image_size=16, val_split=0.2)
    assert torch.equal(again.test_x, b.test_x)  # the split is the same every run


def test_imagefolder_train_test_folders_and_resize(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    _write_images(tmp_path / "train", {"a": 2, "b": 3})
    _write_images(tmp_path / "val", {"b": 1})
    # a 60x20 image half black, half white, split at x=30: after shorter-side resize to 8
    # (24x8) and centre crop 8x8 the left half is black, the right half white
    arr = np.zeros((20, 60), np.uint8)
    arr[:, 30:] = 255
    Image.fromarray(arr).save(tmp_path / "train" / "a" / "zz.png")
    b = D.load_imagefolder(tmp_path, image_size=8, channels=1)
    assert b.spec.num_classes == 2 and b.spec.in_channels == 1
    assert b.train_y.tolist() == [0, 0, 0, 1, 1, 1] and b.test_y.tolist() == [1]
    img = b.train_x[2, 0]
    assert (img[:, :3] == 0).all() and (img[:, 5:] == 255).all()
    _write_images(tmp_path / "val", {"zebra": 1})
    with pytest.raises(DatasetError, match="zebra"):
        D.load_imagefolder(tmp_path)


def test_imagefolder_errors(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    with pytest.raises(ConfigError):
        D.load_dataset("imagefolder")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as e:
        D.load_imagefolder(tmp_path, val_split=0)
    assert_one_line(e, "bad.png")
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    with pytest.raises(DatasetError, match="pip install pillow"):
        D.load_imagefolder(tmp_path)


# ---------------------------------------------------------- the real Fashion-MNIST

@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_DATA_DIR", FASHION_DIR.parent)
    b = D.load_dataset("fashion-mnist")
    assert b.train_x.shape == (60000, 1, 32, 32) and b.test_x.shape == (10000, 1, 32, 32)
    assert b.train_x.dtype == torch.uint8 and b.train_y.dtype == torch.int64
    assert b.train_y.bincount().tolist() == [6000] * 10 and b.test_y.bincount().tolist() == [1000] * 10
    assert b.train_x[:, :, :2].sum() == 0 and b.train_x[:, :, :, 30:].sum() == 0  # the padding
    # recompute the hard-coded constants: exact moments from a histogram of the 61M pixels
    counts = torch.bincount(b.train_x.flatten(), minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * v).sum() / counts.sum()
    std = ((counts * v * v).sum() / counts.sum() - mean ** 2).sqrt()
    spec = D.get_spec("fashion-mnist")
    assert spec.mean[0] == pytest.approx(mean.item(), abs=1e-4)
    assert spec.std[0] == pytest.approx(std.item(), abs=1e-4)
    # the MNIST constants are the 28x28 ones (0.1307, 0.3081) moved to 32x32 the same way
    # that turns this file's 28x28 moments into the padded ones
    m28 = mean.item() * 1024 / 784
    e2_28 = (std.item() ** 2 + mean.item() ** 2) * 1024 / 784
    assert (m28, (e2_28 - m28 ** 2) ** 0.5) == pytest.approx((0.2860, 0.3530), abs=1e-4)
    m, s = 0.1307, 0.3081
    m32 = m * 784 / 1024
    assert D.get_spec("mnist").mean[0] == pytest.approx(m32, abs=1e-4)
    assert D.get_spec("mnist").std[0] == pytest.approx(((s * s + m * m) * 784 / 1024 - m32 ** 2) ** 0.5, abs=1e-4)


def test_training_batches_without_augmentation_are_the_normalised_images():
    get_spec, BatchLoader, normalize = D.get_spec, D.BatchLoader, D.normalize
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 1, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(20)
    spec = get_spec("fashion-mnist")
    loader = BatchLoader(x, y, spec, 20, train=True, augment=False, drop_last=False)
    loader.set_epoch(3)
    (xb, yb), = list(loader)
    torch.testing.assert_close(xb, normalize(x[yb], spec))
    assert not torch.equal(yb, y)  # still shuffled


# ------------------------------------------- imagefolder streamed from disk (memory cap)

_SIZES = [(40, 24), (17, 30), (16, 16), (50, 33), (21, 64), (32, 20)]  # (w, h): resize and crop differ


def _write_mixed_images(folder: Path, n_per_class=6, classes=("ant", "bee", "cow"), seed=0):
    """3 classes x 6 random PNGs of different sizes (one grey), so every transform branch runs."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            w, h = _SIZES[i % len(_SIZES)]
            shape = (h, w) if i == 2 else (h, w, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / c / f"{i:02d}.png")


@pytest.fixture
def both_ways(tmp_path):
    """The same image folder loaded in memory (a huge cap) and streamed (a 1-byte cap)."""
    _write_mixed_images(tmp_path / "imgs")
    mem = D.load_imagefolder(tmp_path / "imgs", image_size=12, val_split=0.2, max_memory_bytes=10 ** 12)
    disk = D.load_imagefolder(tmp_path / "imgs", image_size=12, val_split=0.2, max_memory_bytes=1)
    return mem, disk


def _batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def test_imagefolder_streamed_is_imagefiles_with_the_same_pixels(both_ways):
    mem, disk = both_ways
    assert isinstance(mem.train_x, torch.Tensor) and isinstance(disk.train_x, D.ImageFiles)
    assert isinstance(disk.test_x, D.ImageFiles)
    assert disk.train_x.shape == mem.train_x.shape == (15, 3, 12, 12) and len(disk.test_x) == len(mem.test_x) == 3
    assert disk.train_y.dtype == torch.int64 and torch.equal(disk.train_y, mem.train_y)
    assert torch.equal(disk.test_y, mem.test_y)
    assert disk.spec == mem.spec  # fewer than 2000 training images: the sample is all of them
    # the same per-image transform: identical bytes
    assert torch.equal(disk.train_x.load(range(15)), mem.train_x)
    assert torch.equal(disk.test_x.load(torch.tensor([2, 0])), mem.test_x[[2, 0]])
    assert disk.train_x.load([]).shape == (0, 3, 12, 12)
    assert len(disk.train_x[:4]) == 4 and isinstance(disk.train_x[:4], D.ImageFiles)


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_streamed_batches_equal_in_memory_batches(both_ways, workers):
    mem, disk = both_ways
    spec = mem.spec
    assert spec.flip and spec.crop_pad > 0  # augmentation is on: the random numbers must line up too
    for epoch in (0, 3):
        a = D.BatchLoader(mem.train_x, mem.train_y, spec, 4, train=True, seed=5)
        b = D.BatchLoader(disk.train_x, disk.train_y, spec, 4, train=True, seed=5, workers=workers)
        ea, eb = _batches(a, epoch), _batches(b, epoch)
        assert len(a) == len(b) == len(ea) == len(eb) == 3  # drop_last when training
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    ta = list(D.BatchLoader(mem.test_x, mem.test_y, spec, 2, train=False))
    tb = list(D.BatchLoader(disk.test_x, disk.test_y, spec, 2, train=False, workers=workers))
    assert len(ta) == len(tb) == 2
    for (xa, ya), (xb, yb) in zip(ta, tb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # channels_last and drop_last=False behave as for tensors
    c = D.BatchLoader(disk.train_x, disk.train_y, spec, 4, train=True, drop_last=False, workers=workers,
                      channels_last=True)
    ec = _batches(c, 1)
    assert [len(y) for _, y in ec] == [4, 4, 4, 3]
    assert ec[0][0].is_contiguous(memory_format=torch.channels_last)


def test_imagefolder_streamed_sharding(both_ways):
    mem, disk = both_ways
    spec = mem.spec
    plain = D.normalize(mem.train_x, spec)

    def which(x):  # the training index of each image in a batch (no augmentation: exact match)
        return [int(torch.nonzero((plain == img).flatten(1).all(1))[0]) for img in x]

    shards = []
    for rank in range(2):
        kw = dict(train=True, seed=1, rank=rank, world_size=2, drop_last=False, augment=False)
        a = _batches(D.BatchLoader(mem.train_x, mem.train_y, spec, 3, **kw), 2)
        b = _batches(D.BatchLoader(disk.train_x, disk.train_y, spec, 3, workers=rank * 2, **kw), 2)
        assert len(a) == len(b) == 3
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
        shards.append([i for x, _ in b for i in which(x)])
    assert len(shards[0]) == len(shards[1]) == 8
    assert set(shards[0]) | set(shards[1]) == set(range(15))
    assert len(set(shards[0]) & set(shards[1])) == 1  # 15 samples, 16 slots: one wraps round
    # evaluation shards: disjoint, every test image once
    ev = [torch.cat([y for _, y in D.BatchLoader(disk.test_x, disk.test_y, spec, 2, train=False, rank=r,
                                                 world_size=2, workers=0)]) for r in range(2)]
    assert [len(e) for e in ev] == [2, 1]
    assert sorted(torch.cat(ev).tolist()) == sorted(disk.test_y.tolist())


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_streamed_corrupt_file_is_one_line(tmp_path, workers):
    _write_mixed_images(tmp_path / "train")
    _write_mixed_images(tmp_path / "test", n_per_class=2, seed=1)
    (tmp_path / "test" / "bee" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError) as e:  # in memory: found while loading
        D.load_imagefolder(tmp_path, image_size=8, max_memory_bytes=10 ** 12)
    assert_one_line(e, "zz_bad.png")
    disk = D.load_imagefolder(tmp_path, image_size=8, max_memory_bytes=1)  # streamed: found when decoded
    assert len(disk.test_x) == 7
    loader = D.BatchLoader(disk.test_x, disk.test_y, disk.spec, 2, train=False, workers=workers)
    with pytest.raises(DatasetError) as e:
        list(loader)
    assert_one_line(e, "cannot read image", "zz_bad.png")
    assert "Traceback" not in str(e.value) and "worker" not in str(e.value)


def test_imagefolder_memory_cap_from_env_and_train_subset(tmp_path, monkeypatch):
    _write_mixed_images(tmp_path / "imgs")
    need = 18 * 3 * 8 * 8  # every image, train and test, as uint8
    monkeypatch.setenv("NETSLIM_MAX_MEMORY", str(need))
    assert isinstance(D.load_imagefolder(tmp_path / "imgs", image_size=8).train_x, torch.Tensor)
    monkeypatch.setenv("NETSLIM_MAX_MEMORY", str(need - 1))
    assert isinstance(D.load_imagefolder(tmp_path / "imgs", image_size=8).train_x, D.ImageFiles)
    monkeypatch.setenv("NETSLIM_MAX_MEMORY", "2K")  # 2048 < 3456
    b = D.load_dataset("imagefolder", data_dir=tmp_path / "imgs", image_size=8, train_subset=5)
    assert isinstance(b.train_x, D.ImageFiles) and len(b.train_x) == len(b.train_y) == 5
    assert torch.equal(b.train_x.labels(), b.train_y)
    monkeypatch.setenv("NETSLIM_MAX_MEMORY", "1.5g")
    assert isinstance(D.load_imagefolder(tmp_path / "imgs", image_size=8).train_x, torch.Tensor)
    assert D._parse_bytes("2GiB", "x") == D.DEFAULT_MAX_MEMORY == 2 * 1024 ** 3
    assert D._parse_bytes("512M", "x") == 512 * 1024 ** 2 and D._parse_bytes("1000", "x") == 1000
    monkeypatch.setenv("NETSLIM_MAX_MEMORY", "lots")
    with pytest.raises(ConfigError, match="NETSLIM_MAX_MEMORY"):
        D.load_imagefolder(tmp_path / "imgs")
    with pytest.raises(ConfigError):
        D.load_imagefolder(tmp_path / "imgs", max_memory_bytes=-1)


def test_imagefolder_streamed_stats_sample(tmp_path, monkeypatch):
    _write_mixed_images(tmp_path / "imgs")
    monkeypatch.setattr(D, "_STATS_SAMPLE", 4)  # 15 training images: measure a fixed 4 of them
    a = D.load_imagefolder(tmp_path / "imgs", image_size=8, val_split=0.2, max_memory_bytes=1)
    b = D.load_imagefolder(tmp_path / "imgs", image_size=8, val_split=0.2, max_memory_bytes=1)
    full = D.load_imagefolder(tmp_path / "imgs", image_size=8, val_split=0.2, max_memory_bytes=10 ** 12)
    assert a.spec == b.spec and a.spec.mean != full.spec.mean
    pick = sorted(np.random.default_rng(0).choice(15, 4, replace=False).tolist())
    px = full.train_x[pick].double() / 255
    assert a.spec.mean == pytest.approx(px.mean((0, 2, 3)).tolist(), abs=1e-4)


def test_imagefolder_streamed_fit_and_evaluate_match_in_memory(both_ways):
    from torch import nn

    from netslim.train import TrainConfig, evaluate, fit

    mem, disk = both_ways

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    meta = {"arch": {"name": "t"}, "dataset": mem.spec.as_dict(), "input_size": [3, 12, 12]}
    runs = []
    for data in (mem, disk):
        cfg = TrainConfig(epochs=2, batch_size=4, test_batch_size=2, lr=0.05, seed=3, log_every=1,
                          device="cpu", amp="off", sr=True, s=1e-3)
        m = model()
        out = fit(m, data, cfg, None, meta=meta)
        runs.append(([(r["train_loss"], r["test_loss"]) for r in out["history"]],
                     evaluate(m, data.test_x, data.test_y, data.spec, batch_size=2, amp=None)))
    assert runs[0] == runs[1]
