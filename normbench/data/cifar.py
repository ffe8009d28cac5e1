"""CIFAR-10 / CIFAR-100 from torchvision's on-disk python-pickle format, read here.

CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, labels ``b'labels'``.
CIFAR-100: ``<root>/cifar-100-python/{train, test, meta}``, labels ``b'fine_labels'``.
Each pickle is a dict with bytes keys; ``b'data'`` is uint8 ``(N, 3072)``: R, G, B planes of 32x32,
row-major, i.e. pixel ``(n, c, y, x) = data[n, c*1024 + y*32 + x]``.

Root resolution: ``data.root`` if set (either the parent of the extracted folder, as torchvision
uses it, or the extracted folder itself); else ``~/.cache/normbench/<name>``. Missing files are
downloaded there with torchvision when ``data.download`` is true. The files are not md5-checked
(torchvision's classes do that and would reject locally generated files); they are validated
structurally instead.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .common import DataError, cache_root, download_lock, opt, user_root

SPECS = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key=b"labels",
        num_classes=10,
        tv_class="CIFAR10",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        label_key=b"fine_labels",
        num_classes=100,
        tv_class="CIFAR100",
    ),
}


def _fix(name: str) -> str:
    return f"set data.root to a directory holding {SPECS[name]['folder']}/, or set data.download=true (needs internet)"


def find_folder(name: str, root: Path) -> Path | None:
    spec = SPECS[name]
    for d in (root / spec["folder"], root):
        if all((d / f).is_file() for f in spec["train"] + spec["test"]):
            return d
    return None


def read_batch(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    spec = SPECS[name]
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated pickles raise EOFError/UnpicklingError/ValueError...
        raise DataError(
            f"{name}: cannot unpickle {path} ({type(e).__name__}: {e}); the file is corrupt or truncated, delete it "
            f"and {_fix(name)}"
        ) from None
    if not isinstance(entry, dict):
        raise DataError(
            f"{name}: {path} does not hold a dict (got {type(entry).__name__}); replace the file, or {_fix(name)}"
        )
    label_key = spec["label_key"]
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(label_key, entry.get(label_key.decode()))
    if data is None or labels is None:
        raise DataError(f"{name}: {path} lacks b'data' or {label_key!r}; replace the file, or {_fix(name)}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{name}: {path} b'data' is {data.dtype} {tuple(data.shape)}, expected uint8 (N, 3072); replace the "
            f"file, or {_fix(name)}"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{name}: {path} has {data.shape[0]} images but {labels.size} labels; replace the file, or {_fix(name)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
        raise DataError(
            f"{name}: {path} labels lie in [{labels.min()}, {labels.max()}], expected 0..{spec['num_classes'] - 1}; "
            f"replace the file, or {_fix(name)}"
        )
    return data, labels


def load_split(name: str, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(name, folder / f) for f in SPECS[name][split]]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data).view(-1, 3, 32, 32).contiguous()
    return x, torch.from_numpy(labels)


def _download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, SPECS[name]["tv_class"])
    try:
        with download_lock(root):
            if find_folder(name, root) is None:
                cls(str(root), train=True, download=True)
    except Exception as e:
        raise DataError(
            f"{name}: download into {root} failed ({type(e).__name__}: {e}); set data.root to a directory holding "
            f"{SPECS[name]['folder']}/ or check the internet connection"
        ) from None


def resolve_folder(name: str, cfg) -> Path:
    root = user_root(cfg) or cache_root(name)
    folder = find_folder(name, root)
    if folder is not None:
        return folder
    if not bool(opt(cfg, "download", False)):
        raise DataError(f"{name}: no {SPECS[name]['folder']} files in {root}; {_fix(name)}")
    _download(name, root)
    folder = find_folder(name, root)
    if folder is None:
        raise DataError(
            f"{name}: download into {root} finished but {SPECS[name]['folder']}/ is incomplete; delete it and retry, "
            f"or {_fix(name)}"
        )
    return folder


def load(name: str, cfg) -> dict:
    folder = resolve_folder(name, cfg)
    tr = load_split(name, folder, "train")
    ev = load_split(name, folder, "test")
    return dict(train=tr, eval=ev, num_classes=SPECS[name]["num_classes"], in_channels=3, image_size=32)
