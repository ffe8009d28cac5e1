"""Fashion-MNIST: idx files (gzipped or raw) parsed and validated here.

Root resolution: ``data.root`` if set; else ``/usr/share/datasets/fashion-mnist`` when it holds
the files (Debian package ``dataset-fashion-mnist``); else ``~/.cache/normbench/fashion_mnist``,
downloaded there with torchvision when ``data.download`` is true.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .common import DataError, cache_root, download_lock, opt, user_root

NAME = "fashion_mnist"
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dims
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dim
NUM_CLASSES = 10
FIX = "install Debian's dataset-fashion-mnist, set data.root, or set data.download=true (needs internet)"


def _find(directory: Path, stem: str) -> Path | None:
    for cand in (directory / (stem + ".gz"), directory / stem):
        if cand.is_file():
            return cand
    return None


def find_files(directory: Path) -> dict[str, Path] | None:
    """The four idx files in ``directory`` or in torchvision's ``directory/FashionMNIST/raw``."""
    for d in (directory, directory / "FashionMNIST" / "raw"):
        found = {k: _find(d, stem) for k, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one idx file (gz or raw); validate magic, header and payload size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(
            f"{NAME}: cannot read {path} ({type(e).__name__}: {e}); the file is corrupt or truncated, delete it and "
            f"{FIX}"
        ) from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{NAME}: {path} is truncated ({len(raw)} bytes, header needs {header}); delete it and {FIX}")
    got_magic = int.from_bytes(raw[0:4], "big")
    if got_magic != magic:
        raise DataError(
            f"{NAME}: {path} has magic number {got_magic:#010x}, expected {magic:#010x} (not an idx file of this "
            f"kind); replace it, or {FIX}"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{NAME}: {path} has {len(raw)} bytes but its header {dims} implies {expected}; the file is truncated or "
            f"corrupt, delete it and {FIX}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(files: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(files[f"{split}_images"], IMAGE_MAGIC, 3)
    labels = read_idx(files[f"{split}_labels"], LABEL_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{NAME}: {split} has {images.shape[0]} images but {labels.shape[0]} labels; the files do not belong "
            f"together, replace them or {FIX}"
        )
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{NAME}: {split} images are {images.shape[1]}x{images.shape[2]}, expected 28x28; replace the files or "
            f"{FIX}"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{NAME}: {split} labels go up to {int(labels.max())}, expected 0..9; replace the files or {FIX}"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _download(directory: Path) -> None:
    try:
        from torchvision.datasets import FashionMNIST

        with download_lock(directory):
            if find_files(directory) is None:
                FashionMNIST(str(directory), train=True, download=True)
                FashionMNIST(str(directory), train=False, download=True)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{NAME}: download into {directory} failed ({type(e).__name__}: {e}); install Debian's "
            "dataset-fashion-mnist, set data.root to a directory holding the idx files, or check the internet "
            "connection"
        ) from None


def resolve_files(cfg) -> dict[str, Path]:
    download = bool(opt(cfg, "download", False))
    root = user_root(cfg)
    if root is not None:
        candidates = [root]
    else:
        candidates = [DEBIAN_ROOT, cache_root(NAME)]
    for d in candidates:
        files = find_files(d)
        if files is not None:
            return files
    target = candidates[-1]
    if not download:
        where = " or ".join(str(d) for d in candidates)
        raise DataError(f"{NAME}: no files in {where}; {FIX}")
    _download(target)
    files = find_files(target)
    if files is None:
        raise DataError(f"{NAME}: download into {target} finished but the idx files are not there; {FIX}")
    return files


def load(cfg) -> dict:
    files = resolve_files(cfg)
    tr_x, tr_y = load_split(files, "train")
    ev_x, ev_y = load_split(files, "test")
    return dict(train=(tr_x, tr_y), eval=(ev_x, ev_y), num_classes=NUM_CLASSES, in_channels=1, image_size=28)
