"""Datasets: registry, readers of the official file formats, in-memory batches, augmentation.

A dataset lives in memory as uint8 tensors ([N, C, H, W], 1 byte per pixel); a
`BatchLoader` slices batches out of them, moves the bytes to the device and does the
augmentation (pad + random crop, horizontal flip) and normalisation there, a few tensor
ops per batch. No worker processes, no per-sample Python.

The one exception: an image folder too big for memory (more than `max_memory_bytes`,
default $NETSLIM_MAX_MEMORY or 2 GiB, as uint8) stays on disk as an `ImageFiles` list;
BatchLoader then decodes each batch in DataLoader worker processes and does the same
on-device augmentation and normalisation, so both give identical batches.

Readers (no torchvision):
- mnist, fashion-mnist: IDX files, gzip or raw; 28x28 images are zero-padded to 32x32
  so the CIFAR architectures apply unchanged.
- cifar10, cifar100: the official python pickle batches, as the extracted folder or
  straight from the .tar.gz, unpickled with no globals allowed but numpy's array ones.
- svhn: train_32x32.mat / test_32x32.mat (scipy).
- imagefolder: class sub-folders of images (Pillow), resized and centre-cropped.

Where data is looked for: `data_dir` when given (data_dir/<name>/ or data_dir/ itself,
nothing else), otherwise $NETSLIM_DATA/<name>, the user cache
(($XDG_CACHE_HOME or ~/.cache)/netslim/<name>) and /usr/share/datasets/<name>.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import pickle
import re
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import ConfigError, DatasetError
from .fileio import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = [
    "DatasetSpec", "DATASETS", "DataBundle", "BatchLoader", "DownloadSource", "DOWNLOADS", "SYSTEM_DATA_DIR",
    "list_datasets", "get_spec", "load_dataset", "load_imagefolder", "find_dataset",
    "download_dataset", "search_locations", "augment", "normalize", "ImageFiles", "DEFAULT_MAX_MEMORY",
]


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class DatasetSpec:
    """What a model and the loader need to know about a dataset."""

    name: str
    in_channels: int
    image_size: int               # after padding: the 28x28 sets are padded to 32
    num_classes: int
    mean: tuple[float, ...]       # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    flip: bool                    # random horizontal flip (not for digits)
    crop_pad: int = 4             # zero-pad this many pixels, then random crop back (0: no crop)

    def as_dict(self) -> dict:
        """The facts a checkpoint stores (plain JSON types)."""
        return {"name": self.name, "in_channels": self.in_channels, "image_size": self.image_size,
                "num_classes": self.num_classes, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetSpec":
        """Inverse of `as_dict`. Augmentation settings come from the registry when the name
        is known (a checkpoint does not store them), else: no flip, pad 4."""
        known = DATASETS.get(d["name"])
        return cls(name=d["name"], in_channels=int(d["in_channels"]), image_size=int(d["image_size"]),
                   num_classes=int(d["num_classes"]), mean=tuple(float(v) for v in d["mean"]),
                   std=tuple(float(v) for v in d["std"]),
                   flip=bool(d.get("flip", known.flip if known else False)),
                   crop_pad=int(d.get("crop_pad", known.crop_pad if known else 4)))


# Fashion-MNIST, measured on the padded 32x32 training images (the 60k of
# /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz, float64):
# mean 0.21899983, std 0.33181137 (28x28: 0.28604060 / 0.35302424).
# tests/test_data.py recomputes these from the real file.
_FASHION_MEAN, _FASHION_STD = 0.2190, 0.3318
# MNIST: the usual 28x28 stats are mean 0.1307, std 0.3081. Padding adds 240 zero pixels
# per image, so over 1024 pixels:
#   mean_32 = 0.1307 * 784/1024                          = 0.100067
#   E[x^2]_28 = 0.3081^2 + 0.1307^2 = 0.09492561 + 0.01708249 = 0.1120081
#   E[x^2]_32 = 0.1120081 * 784/1024                     = 0.0857562
#   std_32 = sqrt(0.0857562 - 0.100067^2) = sqrt(0.0757428) = 0.275214
# (the same conversion of the Fashion-MNIST 28x28 stats gives exactly the measured
# padded values above, which checks the arithmetic)
_MNIST_MEAN, _MNIST_STD = 0.1001, 0.2752

# The 28x28 sets crop with a 2-pixel pad: their objects are centred and size-normalised,
# and on top of the 2 px of padding to 32x32 the CIFAR pad of 4 shifts them by up to 4 px
# (1/7 of the object). Measured with the 8-epoch width-0.25 vgg-13 on Fashion-MNIST (step
# schedule, seeds 1 / 2): pad 4 -> 92.05 / 92.00%, pad 2 -> 92.79 / 92.71% (BENCHMARKS.md).
DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec("fashion-mnist", 1, 32, 10, (_FASHION_MEAN,), (_FASHION_STD,), flip=True,
                                 crop_pad=2),
    "mnist": DatasetSpec("mnist", 1, 32, 10, (_MNIST_MEAN,), (_MNIST_STD,), flip=False, crop_pad=2),
    # the seed's CIFAR-10 constants (its std is the often-copied 0.2023, not the true 0.247)
    "cifar10": DatasetSpec("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), flip=True),
    "cifar100": DatasetSpec("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), flip=True),
    "svhn": DatasetSpec("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), flip=False),
}
IMAGEFOLDER = "imagefolder"  # its spec is built from the folder: see load_imagefolder


def list_datasets() -> list[str]:
    """Names `load_dataset` accepts."""
    return [*DATASETS, IMAGEFOLDER]


def get_spec(name: str) -> DatasetSpec:
    """The registered spec of `name`; ConfigError naming the valid names otherwise."""
    if name in DATASETS:
        return DATASETS[name]
    if name == IMAGEFOLDER:
        raise ConfigError("dataset 'imagefolder' has no fixed spec: its classes, size and normalisation "
                          "come from the folder; load it with load_dataset('imagefolder', data_dir=...)")
    raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")


@dataclass
class DataBundle:
    """A dataset: uint8 images [N, C, H, W], int64 labels [N].

    The images are a tensor in memory, or (an image folder over its memory cap, see
    load_imagefolder) an `ImageFiles` that decodes them from disk on demand; BatchLoader
    takes either. The labels are always tensors."""

    spec: DatasetSpec
    train_x: "torch.Tensor | ImageFiles"
    train_y: torch.Tensor
    test_x: "torch.Tensor | ImageFiles"
    test_y: torch.Tensor


# ------------------------------------------------------------------- files and places

_IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
              "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_CIFAR = {
    "cifar10": {"folder": "cifar-10-batches-py", "tar": "cifar-10-python.tar.gz",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "labels": b"labels"},
    "cifar100": {"folder": "cifar-100-python", "tar": "cifar-100-python.tar.gz",
                 "train": ["train"], "test": ["test"], "labels": b"fine_labels"},
}
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


@dataclass(frozen=True)
class DownloadSource:
    """Where the official files of a dataset are and their md5 sums (data, so tests can
    substitute their own)."""

    base_url: str           # a file's URL is base_url + file name
    md5: dict[str, str]     # file name -> md5 hex digest


DOWNLOADS: dict[str, DownloadSource] = {
    "cifar10": DownloadSource("https://www.cs.toronto.edu/~kriz/",
                              {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
    "cifar100": DownloadSource("https://www.cs.toronto.edu/~kriz/",
                               {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}),
    "svhn": DownloadSource("http://ufldl.stanford.edu/housenumbers/",
                           {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
                            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}),
    # torchvision's mirror: yann.lecun.com refuses downloads nowadays
    "mnist": DownloadSource("https://ossci-datasets.s3.amazonaws.com/mnist/",
                            {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": DownloadSource("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                                    {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                     "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                                     "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                                     "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
}

# where Debian's dataset-* packages install (a module constant so tests can move it)
SYSTEM_DATA_DIR = Path("/usr/share/datasets")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "netslim"


def _data_roots() -> list[Path]:
    """The roots searched when no data_dir is given, in order; each holds <name>/ folders."""
    roots = []
    if os.environ.get("NETSLIM_DATA"):
        roots.append(Path(os.environ["NETSLIM_DATA"]).expanduser())
    roots += [_cache_dir(), SYSTEM_DATA_DIR]
    return roots


def search_locations(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders `find_dataset` looks in for `name`, in order."""
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        return [d / name, d]
    return [root / name for root in _data_roots()]


def _idx_path(folder: Path, base: str) -> Path | None:
    """folder/base.gz or folder/base (un-gzipped), whichever exists."""
    for p in (folder / (base + ".gz"), folder / base):
        if p.is_file():
            return p
    return None


def _missing_files(name: str, folder: Path) -> list[str]:
    """The files dataset `name` lacks in `folder` (empty: it is all there)."""
    if name in ("mnist", "fashion-mnist"):
        return [b + ".gz" for b in _IDX_FILES.values() if _idx_path(folder, b) is None]
    if name in _CIFAR:
        c = _CIFAR[name]
        needed = c["train"] + c["test"]
        complete = ((folder / c["tar"]).is_file()
                    or all((folder / c["folder"] / f).is_file() for f in needed)
                    or all((folder / f).is_file() for f in needed))  # data_dir is the extracted folder
        return [] if complete else [c["tar"]]
    return [f for f in _SVHN_FILES.values() if not (folder / f).is_file()]


def _n_files(name: str) -> int:
    """How many files `_missing_files` can report missing for `name`."""
    return {"mnist": 4, "fashion-mnist": 4, "svhn": 2}.get(name, 1)


def _expected(name: str) -> str:
    if name in ("mnist", "fashion-mnist"):
        return "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, " \
               "t10k-labels-idx1-ubyte.gz (or un-gzipped)"
    if name in _CIFAR:
        return f"{_CIFAR[name]['tar']} or the extracted {_CIFAR[name]['folder']}/"
    return ", ".join(_SVHN_FILES.values())


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return "install it with `apt-get install dataset-fashion-mnist` or run with --download"
    return "run with --download to fetch it"


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding dataset `name`'s files; DatasetError (one line) if none does.

    With `data_dir`, only data_dir/<name> and data_dir itself are looked at: a data_dir
    the user named but that lacks the data is an error, never a silent fallback."""
    get_spec(name)
    places = search_locations(name, data_dir)
    partial = []
    for folder in places:
        if not folder.is_dir():
            continue
        missing = _missing_files(name, folder)
        if not missing:
            log.debug("found %s in %s", name, folder)
            return folder
        if len(missing) < _n_files(name):  # some files are there: say which are not
            partial.append(f"{folder} lacks {', '.join(missing)}")
    where = f"in --data-dir {data_dir}" if data_dir is not None else "anywhere netslim looks"
    msg = (f"dataset {name!r} not found {where} (looked in: {', '.join(map(str, places))}; "
           f"expected {_expected(name)})")
    if partial:
        msg += f"; incomplete: {'; '.join(partial)}"
    raise DatasetError(f"{msg}; {_how_to_get(name)}")


# --------------------------------------------------------------------------- download

def _download_root(data_dir: str | os.PathLike | None) -> Path:
    """Where --download puts files: data_dir when given, else $NETSLIM_DATA when writable,
    else the user cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    candidates = []
    if os.environ.get("NETSLIM_DATA"):
        candidates.append(Path(os.environ["NETSLIM_DATA"]).expanduser())
    candidates.append(_cache_dir())
    for root in candidates:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            return root
    raise DatasetError(f"no writable place to download to (tried {', '.join(map(str, candidates))}); "
                       "set NETSLIM_DATA to a writable folder or pass --data-dir")


def download_dataset(name: str, root: str | os.PathLike, *, mirror: str | None = None,
                     md5: dict[str, str] | None = None) -> Path:
    """Fetch the official files of `name` into root/<name>/ and return that folder.

    Files already there are kept. Each file is checked against its md5 before it is
    written (atomically), so a failed or corrupt download leaves nothing behind.
    `mirror` (default: $NETSLIM_MIRROR, else the official sites) is a URL holding
    <name>/<file>, e.g. file:///srv/datasets. `md5` replaces the table in DOWNLOADS."""
    if name not in DOWNLOADS:
        raise ConfigError(f"dataset {name!r} cannot be downloaded; downloadable: {', '.join(DOWNLOADS)}")
    import urllib.error
    import urllib.request

    source = DOWNLOADS[name]
    sums = md5 if md5 is not None else source.md5
    mirror = mirror if mirror is not None else os.environ.get("NETSLIM_MIRROR") or None
    folder = Path(root).expanduser() / name
    for fname, want in sums.items():
        target = folder / fname
        if target.is_file():
            continue
        url = f"{mirror.rstrip('/')}/{name}/{fname}" if mirror else source.base_url + fname
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                blob = r.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DatasetError(f"could not download {url}: {_one_line(reason)}; "
                               f"fetch it by hand into {folder}") from None
        got = hashlib.md5(blob).hexdigest()
        if got != want:
            raise DatasetError(f"checksum mismatch for {url}: md5 {got}, expected {want} "
                               "(incomplete or tampered download); nothing was saved")
        atomic_write_bytes(target, blob)
        log.info("saved %s (%.1f MB)", target, len(blob) / 1e6)
    return folder


# ---------------------------------------------------------------------------- readers

def _one_line(e: Any) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read_file(path: Path) -> bytes:
    """The bytes of `path`, gunzipped when it ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read {path}: {_one_line(e)} (truncated or corrupt; "
                           "delete it and fetch it again)") from None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions (LeCun's MNIST format)."""
    buf = _read_file(path)
    head = 4 + 4 * ndim
    # magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions
    if len(buf) < head or buf[:4] != bytes([0, 0, 8, ndim]):
        raise DatasetError(f"{path} is not an IDX file of {ndim}-d unsigned bytes "
                           f"(magic {buf[:4].hex() or 'missing'}, want 000008{ndim:02x})")
    dims = struct.unpack(f">{ndim}I", buf[4:head])
    want = head + math.prod(dims)
    if len(buf) != want:
        raise DatasetError(f"{path} has {len(buf)} bytes, its header {list(dims)} needs {want} "
                           "(truncated or corrupt; delete it and fetch it again)")
    return np.frombuffer(buf, dtype=np.uint8, offset=head).reshape(dims)


def _check_labels(labels: np.ndarray, n_images: int, num_classes: int, where: str) -> torch.Tensor:
    if labels.shape != (n_images,):
        raise DatasetError(f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {n_images} images")
    if n_images and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{where}: labels span {int(labels.min())}..{int(labels.max())}, "
                           f"outside 0..{num_classes - 1}")
    return torch.from_numpy(labels.astype(np.int64))


def _read_idx_split(folder: Path, spec: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_path = _idx_path(folder, _IDX_FILES[f"{split}_images"])
    lbl_path = _idx_path(folder, _IDX_FILES[f"{split}_labels"])
    images = _read_idx(img_path, 3)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{img_path} holds {images.shape[1]}x{images.shape[2]} images, "
                           f"{spec.name} images are 28x28")
    labels = _read_idx(lbl_path, 1)
    y = _check_labels(labels, images.shape[0], spec.num_classes, f"{lbl_path} vs {img_path.name}")
    # zero-pad 28x28 -> 32x32 (2 px a side) so the 32x32 CIFAR architectures apply as is
    pad = (spec.image_size - 28) // 2
    x = np.zeros((images.shape[0], 1, spec.image_size, spec.image_size), dtype=np.uint8)
    x[:, 0, pad:pad + 28, pad:pad + 28] = images
    return torch.from_numpy(x), y


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else.

    A pickle can call any importable function; the CIFAR batches need exactly the three
    globals numpy uses to rebuild an array, so every other global is refused."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),   # written by numpy 1.x (the CIFAR files)
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 2.x
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return {"_reconstruct": _numpy_reconstruct(), "ndarray": np.ndarray, "dtype": np.dtype}[name]


def _unpickle_batch(blob: bytes, where: str) -> dict:
    try:
        d = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can raise nearly anything
        raise DatasetError(f"{where} is not a readable CIFAR batch: {_one_line(e)}") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{where} is not a CIFAR batch (holds a {type(d).__name__}, not a dict)")
    return d


def _cifar_batch(d: dict, where: str, spec: DatasetSpec, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    data = d.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{where}: b'data' should be uint8 [N, 3072], is {desc}")
    if label_key not in d:
        raise DatasetError(f"{where}: no {label_key!r} entry")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{where}: unreadable {label_key!r}: {_one_line(e)}") from None
    y = _check_labels(labels, data.shape[0], spec.num_classes, where)
    # each row is 1024 red, 1024 green, 1024 blue bytes, each plane row-major
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, y


def _read_cifar(folder: Path, spec: DatasetSpec) -> tuple[torch.Tensor, ...]:
    c = _CIFAR[spec.name]
    wanted = c["train"] + c["test"]
    blobs: dict[str, tuple[bytes, str]] = {}   # batch name -> (pickle bytes, where it came from)
    # the extracted folder (inside `folder`, or `folder` itself), else the archive
    extracted = next((d for d in (folder / c["folder"], folder)
                      if all((d / f).is_file() for f in wanted)), None)
    if extracted is not None:
        for f in wanted:
            p = extracted / f
            try:
                blobs[f] = (p.read_bytes(), str(p))
            except OSError as e:
                raise DatasetError(f"cannot read {p}: {_one_line(e)}") from None
    else:
        tar_path = folder / c["tar"]
        try:
            # read the members we need straight out of the archive, in one sequential pass
            with tarfile.open(tar_path, "r:gz") as tar:
                for m in tar:
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and base in wanted and m.name.startswith(c["folder"] + "/"):
                        blobs[base] = (tar.extractfile(m).read(), f"{tar_path}:{m.name}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"cannot read {tar_path}: {_one_line(e)} (truncated or corrupt; "
                               "delete it and fetch it again)") from None
        lacking = [f for f in wanted if f not in blobs]
        if lacking:
            raise DatasetError(f"{tar_path} lacks {', '.join(c['folder'] + '/' + f for f in lacking)}")

    def split(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for n in names:
            blob, where = blobs.pop(n)  # pop: free each pickle once decoded
            x, y = _cifar_batch(_unpickle_batch(blob, where), where, spec, c["labels"])
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    return (*split(c["train"]), *split(c["test"]))


def _read_svhn_split(path: Path, spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import scipy.io
    except ImportError:
        raise DatasetError("reading SVHN needs scipy: `pip install scipy` "
                           "(or `pip install netslim[svhn]`)") from None
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # noqa: BLE001 - scipy raises ValueError, MatReadError, TypeError, ... on bad files
        raise DatasetError(f"cannot read {path}: {_one_line(e)} (truncated or corrupt; "
                           "delete it and fetch it again)") from None
    X, y = mat.get("X"), mat.get("y")
    if not isinstance(X, np.ndarray) or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DatasetError(f"{path}: 'X' should be [32, 32, 3, N], is "
                           f"{list(X.shape) if isinstance(X, np.ndarray) else 'missing'}")
    if not isinstance(y, np.ndarray):
        raise DatasetError(f"{path}: no 'y' labels")
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN writes digit 0 as label 10
    y_t = _check_labels(labels, X.shape[3], spec.num_classes, str(path))
    # [H, W, C, N] -> [N, C, H, W]
    x_t = torch.from_numpy(np.ascontiguousarray(X.astype(np.uint8, copy=False).transpose(3, 2, 0, 1)))
    return x_t, y_t


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 train_subset: int | None = None, image_size: int | None = None,
                 val_split: float | None = None, max_memory_bytes: int | None = None) -> DataBundle:
    """Read dataset `name` into memory as uint8 tensors.

    `download`: fetch the official files if they are not found. `train_subset`: keep the
    first N training images. `image_size` (default 32), `val_split` (default 0.1) and `max_memory_bytes`
    are for 'imagefolder' (see load_imagefolder: over the cap its images stay on disk as
    `ImageFiles`); the other datasets have a fixed size and are always in memory."""
    if train_subset is not None and train_subset < 1:
        raise ConfigError(f"train_subset must be at least 1, got {train_subset}")
    if name == IMAGEFOLDER:
        if data_dir is None:
            raise ConfigError("dataset 'imagefolder' needs --data-dir: a folder of class sub-folders of images")
        if download:
            raise ConfigError("dataset 'imagefolder' cannot be downloaded: point --data-dir at your images")
        bundle = load_imagefolder(data_dir, image_size=image_size or 32,
                                  val_split=0.1 if val_split is None else val_split,
                                  max_memory_bytes=max_memory_bytes)
    else:
        spec = get_spec(name)
        if image_size is not None and image_size != spec.image_size:
            raise ConfigError(f"dataset {name!r} has {spec.image_size}x{spec.image_size} images; "
                              "image_size can only be chosen for 'imagefolder'")
        try:
            folder = find_dataset(name, data_dir)
        except DatasetError:
            if not download:
                raise
            folder = download_dataset(name, _download_root(data_dir))
        if name in ("mnist", "fashion-mnist"):
            tx, ty = _read_idx_split(folder, spec, "train")
            vx, vy = _read_idx_split(folder, spec, "test")
        elif name in _CIFAR:
            tx, ty, vx, vy = _read_cifar(folder, spec)
        else:
            tx, ty = _read_svhn_split(folder / _SVHN_FILES["train"], spec)
            vx, vy = _read_svhn_split(folder / _SVHN_FILES["test"], spec)
        bundle = DataBundle(spec, tx, ty, vx, vy)
        log.info("loaded %s from %s: %d train, %d test images", name, folder, len(ty), len(vy))
    if train_subset is not None and train_subset < len(bundle.train_y):
        # clone so the rest of the training set can be freed (an ImageFiles slice is a new list)
        head = bundle.train_x[:train_subset]
        bundle.train_x = head.clone() if isinstance(head, torch.Tensor) else head
        bundle.train_y = bundle.train_y[:train_subset].clone()
    elif train_subset is not None and train_subset > len(bundle.train_y):
        log.warning("train_subset=%d > %d training images: using all of them", train_subset, len(bundle.train_y))
    return bundle


# ------------------------------------------------------------------------ imagefolder

_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _list_images(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class names and (image path, class index), like torchvision's ImageFolder."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    elif not set(found) <= set(classes):
        raise DatasetError(f"{folder} has classes the training folder lacks: "
                           f"{', '.join(sorted(set(found) - set(classes)))}")
    samples = []
    for i, c in enumerate(classes):
        if not (folder / c).is_dir():
            continue
        files = sorted(p for p in (folder / c).rglob("*") if p.suffix.lower() in _IMG_EXTENSIONS and p.is_file())
        samples += [(p, i) for p in files]
    return classes, samples


def _decode_image(path: str | os.PathLike, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 [channels, size, size]: the shorter side resized to `size`
    (bilinear), then centre-cropped (torchvision Resize + CenterCrop). The only image
    transform: the in-memory and the streamed image folders both use it, so they give
    identical pixels. DatasetError (one line, naming the file) when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            w, h = im.size
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = round((nw - size) / 2), round((nh - size) / 2)
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    # UnidentifiedImageError is an OSError; a broken file can also raise SyntaxError,
    # struct.error, zlib.error, EOFError or IndexError from inside a Pillow plugin
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
            Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {_one_line(e)}") from None
    # a copy: Pillow's array is read-only, and [C, S, S] order is what the tensors hold
    return np.array(a[None] if channels == 1 else a.transpose(2, 0, 1), dtype=np.uint8, order="C")


def _load_images(samples: list[tuple[Path, int]], size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.zeros((len(samples), channels, size, size), dtype=np.uint8)
    for k, (path, _) in enumerate(samples):
        x[k] = _decode_image(path, size, channels)
    y = np.array([c for _, c in samples], dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


class ImageFiles:
    """Images left on disk: (path, label) pairs, decoded on demand to uint8 [C, S, S].

    What an image folder over its memory cap holds instead of a uint8 tensor. It answers
    what BatchLoader and the training code ask of the images: len(), .shape (N, C, S, S),
    .dtype (uint8), .dim(), a slice (a new ImageFiles) and `load(indices)`, which decodes
    those images with the same transform as the in-memory path. Plain data, so it pickles
    cheaply into DataLoader workers."""

    dtype = torch.uint8

    def __init__(self, samples: list[tuple[str | os.PathLike, int]], image_size: int, channels: int) -> None:
        self.samples = [(str(p), int(c)) for p, c in samples]
        self.image_size = int(image_size)
        self.channels = int(channels)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.samples), self.channels, self.image_size, self.image_size))

    def dim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        """What the decoded images would take in memory as uint8."""
        return len(self.samples) * self.channels * self.image_size ** 2

    def labels(self) -> torch.Tensor:
        """The class indices, int64 [N]."""
        return torch.tensor([c for _, c in self.samples], dtype=torch.int64)

    def __getitem__(self, key: slice) -> "ImageFiles":
        if not isinstance(key, slice):
            raise TypeError("ImageFiles takes a slice; use load(indices) for the pixels")
        return ImageFiles(self.samples[key], self.image_size, self.channels)

    def load(self, indices: torch.Tensor | list[int] | range) -> torch.Tensor:
        """uint8 [len(indices), C, S, S]: the images at `indices`, decoded in order.
        DatasetError (one line, naming the file) for a file that cannot be read."""
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        x = np.empty((len(idx), self.channels, self.image_size, self.image_size), dtype=np.uint8)
        for k, i in enumerate(idx):
            x[k] = _decode_image(self.samples[i][0], self.image_size, self.channels)
        return torch.from_numpy(x)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} images, {self.channels}x{self.image_size}x{self.image_size})"


DEFAULT_MAX_MEMORY = 2 * 1024 ** 3  # bytes of uint8 images an image folder may hold in memory
_STATS_SAMPLE = 2000                # images a streamed folder's mean/std are measured on
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def _parse_bytes(text: str, where: str) -> int:
    """'2G', '512M', '1.5GiB', '300000' -> bytes (the suffixes are binary: K = 1024)."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?", text.strip().lower())
    if m is None or (m.group(2) == "" and text.strip().lower().endswith("ib")):
        raise ConfigError(f"{where}={text!r} is not a size in bytes (e.g. 2G, 512M, 1000000)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _max_memory(max_memory_bytes: int | None) -> int:
    if max_memory_bytes is not None:
        if max_memory_bytes < 0:
            raise ConfigError(f"max_memory_bytes must be >= 0, got {max_memory_bytes}")
        return int(max_memory_bytes)
    env = os.environ.get("NETSLIM_MAX_MEMORY")
    return _parse_bytes(env, "NETSLIM_MAX_MEMORY") if env else DEFAULT_MAX_MEMORY


def _channel_stats(counts: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of pixels in [0, 1] from byte-value histograms [C, 256]."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in counts.double():
        m = (c * levels).sum() / c.sum()
        var = (c * levels * levels).sum() / c.sum() - m * m
        mean.append(round(m.item(), 4))
        std.append(round(max(var.clamp(min=0).sqrt().item(), 1e-3), 4))  # a constant channel: no 0-division
    return tuple(mean), tuple(std)


def load_imagefolder(root: str | os.PathLike, *, image_size: int = 32, val_split: float = 0.1,
                     channels: int = 3, flip: bool = True, max_memory_bytes: int | None = None) -> DataBundle:
    """A folder of class sub-folders of images, as uint8 [N, C, size, size].

    Uses root/train and root/test (or root/val) when present; otherwise every class keeps
    a `val_split` fraction of its images (a fixed seeded choice, the same on every run)
    for testing. Images are resized (shorter side) and centre-cropped to `image_size`.

    Memory: when the decoded train + test images (N * C * size^2 bytes) fit in
    `max_memory_bytes` (default: $NETSLIM_MAX_MEMORY, e.g. 8G or 500M, else 2 GiB) they
    are decoded now into uint8 tensors. Otherwise train_x / test_x are `ImageFiles` and
    BatchLoader decodes each batch from disk in worker processes (identical pixels; a
    file that cannot be read is then reported when its batch is decoded).

    The normalisation is the per-channel mean/std of the training pixels: exact over all
    training images in memory; when streaming, over a fixed sample of at most 2000
    training images (every one when there are no more; otherwise a seeded choice, the
    same on every run), so opening a large folder does not decode all of it."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DatasetError("reading image folders needs Pillow: `pip install pillow` "
                           "(or `pip install netslim[images]`)") from None
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    if image_size < 1:
        raise ConfigError(f"image_size must be at least 1, got {image_size}")
    if not 0 <= val_split < 1:
        raise ConfigError(f"val_split must be in [0, 1), got {val_split}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes, train = _list_images(root / "train")
        _, test = _list_images(test_dir, classes)
    else:
        classes, samples = _list_images(root)
        rng = np.random.default_rng(0)  # fixed: the split must not change between runs
        train, test = [], []
        for i in range(len(classes)):
            mine = [s for s in samples if s[1] == i]
            n_test = round(len(mine) * val_split)
            is_test = np.zeros(len(mine), dtype=bool)
            is_test[rng.permutation(len(mine))[:n_test]] = True
            train += [s for s, t in zip(mine, is_test) if not t]
            test += [s for s, t in zip(mine, is_test) if t]
    if not train:
        raise DatasetError(f"no images found under {root} (expected <class>/<image> with extensions "
                           f"{', '.join(_IMG_EXTENSIONS)})")
    empty = [c for i, c in enumerate(classes) if not any(lbl == i for _, lbl in train)]
    if empty:
        raise DatasetError(f"{root}: class folders without training images: {', '.join(empty)}")
    cap = _max_memory(max_memory_bytes)
    need = (len(train) + len(test)) * channels * image_size * image_size
    if need <= cap:
        tx, ty = _load_images(train, image_size, channels)
        vx, vy = _load_images(test, image_size, channels)
        # per-channel mean/std of the training pixels, exact, from a histogram of byte values
        # (no float copy of the whole set)
        counts = torch.stack([torch.bincount(tx[:, c].flatten(), minlength=256) for c in range(channels)])
        how = "in memory"
    else:
        tx, vx = ImageFiles(train, image_size, channels), ImageFiles(test, image_size, channels)
        ty, vy = tx.labels(), vx.labels()
        n = len(tx)
        if n <= _STATS_SAMPLE:
            pick = range(n)
        else:  # fixed seed: the same sample, so the same normalisation, on every run
            pick = sorted(np.random.default_rng(0).choice(n, _STATS_SAMPLE, replace=False).tolist())
        counts = torch.zeros(channels, 256, dtype=torch.int64)
        for i in pick:
            a = torch.from_numpy(_decode_image(tx.samples[i][0], image_size, channels))
            for c in range(channels):
                counts[c] += torch.bincount(a[c].flatten(), minlength=256)
        how = (f"streamed from disk ({_fmt_bytes(need)} decoded > the {_fmt_bytes(cap)} cap; "
               f"normalisation from {len(pick)} training images)")
    mean, std = _channel_stats(counts)
    spec = DatasetSpec(IMAGEFOLDER, channels, image_size, len(classes), mean, std, flip=flip)
    log.info("loaded image folder %s: %d classes, %d train, %d test images, %s",
             root, len(classes), len(ty), len(vy), how)
    return DataBundle(spec, tx, ty, vx, vy)


# ------------------------------------------------------------ augmentation and batches

def normalize(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 pixels [B, C, H, W] -> float32 (x / 255 - mean) / std, on x's device."""
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device)
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (-mean / std).view(1, -1, 1, 1)
    # one fused multiply-add instead of divide, subtract, divide
    return torch.addcmul(shift, x.float(), scale)


def augment(x: torch.Tensor, spec: DatasetSpec, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by spec.crop_pad, crop back to H x W at a random offset per sample, and
    flip each sample horizontally with probability 1/2 when spec.flip.

    Works on any dtype (pass raw uint8 pixels to pad with black, as torchvision's
    RandomCrop on images does) and on x's device; the random numbers come from the CPU
    `generator` so a seed gives the same result on every device. Returns a new tensor of
    x's shape and dtype."""
    B, C, H, W = x.shape
    p = spec.crop_pad
    if B == 0 or (p == 0 and not spec.flip):
        return x.clone()
    # draw on the CPU generator, then move: identical offsets on every device
    oy = torch.randint(0, 2 * p + 1, (B, 1), generator=generator).to(x.device, non_blocking=True)
    ox = torch.randint(0, 2 * p + 1, (B, 1), generator=generator).to(x.device, non_blocking=True)
    rows = oy + torch.arange(H, device=x.device)               # [B, H] rows of the padded image
    cols = ox + torch.arange(W, device=x.device)               # [B, W]
    if spec.flip:
        flip = (torch.rand(B, 1, generator=generator) < 0.5).to(x.device, non_blocking=True)
        cols = torch.where(flip, cols.flip(1), cols)           # read the columns right to left
    Wp = W + 2 * p
    padded = torch.nn.functional.pad(x, (p, p, p, p)) if p else x  # [B, C, H+2p, W+2p]
    # flat index into each padded plane of the pixel that lands at (i, j)
    index = (rows[:, :, None] * Wp + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    out = padded.reshape(B, C, -1).gather(2, index)              # [B, C, H*W]
    return out.view(B, C, H, W)


class _BatchDecoder(torch.utils.data.Dataset):
    """Item b = batch b of `idx` decoded from `files` (uint8 [B, C, S, S]); or, when an image
    cannot be read, the one-line message, so that the main process raises a DatasetError
    rather than a worker's traceback."""

    def __init__(self, files: ImageFiles, idx: torch.Tensor, batch_size: int, n_batches: int) -> None:
        self.files, self.idx, self.batch_size, self.n_batches = files, idx, batch_size, n_batches

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, b: int) -> torch.Tensor | str:
        try:
            return self.files.load(self.idx[b * self.batch_size:(b + 1) * self.batch_size])
        except DatasetError as e:
            return str(e)


def _seeded_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `key`: distinct keys give unrelated streams."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class BatchLoader:
    """Iterates (x float32 [B, C, H, W] normalised, y int64 [B]) on `device`.

    train=True: a fresh shuffle and augmentation every epoch, both drawn from generators
    seeded by (seed, epoch) (and the rank for augmentation), so a run resumed at an epoch
    boundary sees exactly the batches it would have seen. Call `set_epoch(e)` before each
    epoch, as with DistributedSampler; iterating twice without it repeats the epoch.
    train=False: the data in order, normalised only.

    With world_size > 1 each rank gets a disjoint shard. Training shards are padded by
    wrapping so every rank has the same number of batches (DistributedSampler's rule);
    evaluation shards are not padded (rank r takes samples r, r+W, ...), so summing
    correct counts over ranks scores every test image exactly once.

    Each batch is gathered on the host and sent to `device` as uint8 (1 byte per pixel);
    preload=True instead copies the whole uint8 dataset to `device` once (fastest on a
    GPU; costs N*C*H*W bytes of device memory).

    `x_uint8` may also be an `ImageFiles` (an image folder left on disk): each batch is then
    decoded by a torch DataLoader over whole batches of indices, in `workers` processes
    (default min(4, CPU count); 0 decodes in this process), and augmented and normalised
    on the device exactly as a tensor's would be: the same order, shards and random
    numbers, so the same batches. `preload` does not apply to it."""

    def __init__(self, x_uint8: "torch.Tensor | ImageFiles", y: torch.Tensor, spec: DatasetSpec,
                 batch_size: int, *, train: bool, device: str | torch.device = "cpu", seed: int = 0,
                 drop_last: bool | None = None, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, preload: bool = False, augment: bool = True,
                 workers: int | None = None) -> None:
        files = isinstance(x_uint8, ImageFiles)
        if not files and (not isinstance(x_uint8, torch.Tensor) or x_uint8.dtype != torch.uint8
                          or x_uint8.dim() != 4):
            got = (f"{x_uint8.dtype} {list(x_uint8.shape)}" if isinstance(x_uint8, torch.Tensor)
                   else type(x_uint8).__name__)
            raise ValueError(f"x_uint8 must be uint8 [N, C, H, W] or ImageFiles, got {got}")
        if y.dim() != 1 or len(y) != len(x_uint8):
            raise ValueError(f"y must be [N] with N={len(x_uint8)}, got {list(y.shape)}")
        if x_uint8.shape[1] != spec.in_channels:
            raise ValueError(f"images have {x_uint8.shape[1]} channels, spec {spec.name} says {spec.in_channels}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if workers is not None and workers < 0:
            raise ConfigError(f"workers must be >= 0, got {workers}")
        self.device = torch.device(device)
        self.spec = spec
        self.batch_size = batch_size
        self.train = train
        self.augment = augment  # pad/crop/flip on training batches (off for MLPs: position matters)
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        self.epoch = 0
        self.workers = min(4, os.cpu_count() or 1) if workers is None else workers
        preload = preload and not files  # files are decoded batch by batch on the host
        self.x = x_uint8.to(self.device) if preload else x_uint8
        self.y = y.long().to(self.device) if preload else y.long()
        n = len(y)
        # samples per rank: padded up when training, exact (r, r+W, ...) when evaluating
        self.num_samples = math.ceil(n / world_size) if train else len(range(rank, n, world_size))
        # normalisation as one multiply-add, the constants made once on the device
        std = torch.tensor(spec.std, dtype=torch.float32)
        mean = torch.tensor(spec.mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, -1, 1, 1).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and augmentation of `epoch`."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch."""
        n = len(self.y)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        # every rank draws the same permutation, then takes its stride of it
        perm = torch.randperm(n, generator=_seeded_generator("shuffle", self.seed, self.epoch))
        total = self.num_samples * self.world_size
        if total > n:  # wrap around so every rank gets the same number of samples
            perm = torch.cat([perm, perm.repeat(math.ceil((total - n) / n))[: total - n]])
        return perm[self.rank:total:self.world_size]

    def _host_batches(self, idx: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) of each batch of `idx`, before any move or augmentation."""
        if not isinstance(self.x, ImageFiles):
            if self.x.device != idx.device:
                idx = idx.to(self.x.device)
            for b in range(len(self)):
                sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
                yield self.x.index_select(0, sel), self.y.index_select(0, sel.to(self.y.device))
            return
        # one DataLoader item = one whole batch, decoded by a worker; the order stays ours
        batches = _BatchDecoder(self.x, idx, self.batch_size, len(self))
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False,
                                             num_workers=min(self.workers, len(batches)),
                                             persistent_workers=False)
        for b, xb in enumerate(loader):
            if isinstance(xb, str):  # a worker could not read an image: say which, in one line
                raise DatasetError(xb)
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield xb, self.y.index_select(0, sel.to(self.y.device))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        # augmentation randomness differs per rank, so ranks do not share crop offsets
        gen = (_seeded_generator("augment", self.seed, self.epoch, self.rank)
               if self.train and self.augment else None)
        host = isinstance(self.x, ImageFiles) or self.x.device.type == "cpu"
        pin = self.device.type == "cuda" and host
        for xb, yb in self._host_batches(idx):
            if xb.device != self.device:
                if pin:  # page-locked host memory lets the copy run asynchronously
                    xb, yb = xb.pin_memory(), yb.pin_memory()
                xb = xb.to(self.device, non_blocking=True)
                yb = yb.to(self.device, non_blocking=True)
            if gen is not None:
                xb = augment(xb, self.spec, gen)
            out = torch.addcmul(self._shift, xb.float(), self._scale)  # (x/255 - mean) / std
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, yb
