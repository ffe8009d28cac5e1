"""Shared pieces of the data layer: errors, the bundle, deterministic epoch orders.

Determinism rule (the same for every dataset and every world size):

* epoch ``e`` visits the training set in the order
  ``torch.randperm(num_train, generator=epoch_generator(seed, e, STREAM_ORDER))``;
* global batch ``b`` is ``perm[b*G:(b+1)*G]`` (``G`` = global batch, last partial batch dropped);
* rank ``r`` of ``w`` takes positions ``r, r + w, r + 2w, ...`` of that global batch, in that order. With
  per-GPU statistics a position ``p`` is then on emulated GPU ``p mod gpus`` whatever the number of processes
  (each process emulates ``gpus / w`` GPUs with the same rule: ``normbench.norms._common.split_gpus``);
* random augmentation parameters are drawn once per epoch, one per *position* of the
  epoch's order, from ``epoch_generator(seed, e, STREAM_AUGMENT)`` -- never from the
  global torch RNG -- so the image at a given position gets the same augmentation
  whatever the world size, and resuming at epoch ``e`` replays the same data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

STREAM_ORDER = 0
STREAM_AUGMENT = 1


class DataError(RuntimeError):
    """A data problem the user can fix; the message is one line naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class TrainLoader(Protocol):
    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class EvalLoader(Protocol):
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class DataBundle:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int  # training images actually used (after data.train_subset)
    num_eval: int  # size of the whole eval set (all ranks together)
    train: TrainLoader
    eval: EvalLoader


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (neighbouring seeds/epochs give unrelated streams)."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(mix_seed(seed, epoch, stream))
    return g


def epoch_permutation(num_train: int, seed: int, epoch: int) -> torch.Tensor:
    """The global visiting order of epoch ``epoch`` (CPU int64)."""
    return torch.randperm(num_train, generator=epoch_generator(seed, epoch, STREAM_ORDER))


def check_batch(name: str, global_batch: int, rank: int, world_size: int, num_train: int) -> int:
    """Validate the batch geometry; returns the per-rank batch size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(
            f"{name}: rank {rank} is not in [0, world_size={world_size}); pass the torchrun RANK/WORLD_SIZE"
        )
    if global_batch < 1:
        raise DataError(f"{name}: global batch {global_batch} must be positive; set gpus and per_gpu_batch >= 1")
    if global_batch % world_size != 0:
        raise DataError(
            f"{name}: global batch {global_batch} is not divisible by world size {world_size}; "
            f"choose a global batch (gpus x per_gpu_batch) that is a multiple of the number of processes"
        )
    if num_train < global_batch:
        raise DataError(
            f"{name}: only {num_train} training images but the global batch is {global_batch}, so an epoch has no "
            "step; "
            f"lower the batch or raise data.train_subset/num_train"
        )
    return global_batch // world_size


def epoch_images(name: str, cfg: Any, num_train: int, global_batch: int) -> int:
    """Training images per epoch: ``data.epoch_size`` -- the first that many positions of the epoch's shuffled
    order of the whole training set, so short epochs still see all the data over a run -- or every image."""
    size = opt(cfg, "epoch_size", None)
    if size is None:
        return num_train
    if not isinstance(size, int) or isinstance(size, bool) or not global_batch <= size <= num_train:
        raise DataError(
            f"{name}: data.epoch_size={size!r} must be an integer in [global batch {global_batch}, "
            f"{num_train} training images], or null for full epochs"
        )
    return size


def rank_slice(global_batch: int, rank: int, world_size: int, step: int = 0) -> slice:
    """This rank's positions in the epoch order for global batch number ``step``: every ``world_size``-th
    position from ``rank`` (see the module docstring)."""
    start = step * global_batch
    return slice(start + rank, start + global_batch, world_size)


def eval_shard(num_eval: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, disjoint shards whose union is the whole eval set (sizes differ by at most one)."""
    return (rank * num_eval) // world_size, ((rank + 1) * num_eval) // world_size


def opt(cfg: Any, key: str, default: Any = None) -> Any:
    """Read an optional config key (works in struct mode; missing or null -> default)."""
    try:
        if key in cfg:
            value = cfg[key]
            return default if value is None else value
    except Exception:  # pragma: no cover - exotic config objects
        pass
    return default


def req(cfg: Any, key: str, name: str) -> Any:
    try:
        present = key in cfg
    except Exception:  # pragma: no cover
        present = False
    if not present or cfg[key] is None:
        raise DataError(f"{name}: config key data.{key} is missing or null; add it to configs/data/{name}.yaml")
    return cfg[key]


def apply_train_subset(name: str, cfg: Any, num_available: int) -> int:
    subset = opt(cfg, "train_subset", None)
    if subset is None:
        return num_available
    subset = int(subset)
    if subset < 1 or subset > num_available:
        raise DataError(
            f"{name}: data.train_subset={subset} but the training set has {num_available} images; "
            f"set data.train_subset to a value in [1, {num_available}] or null"
        )
    return subset


def per_channel(name: str, key: str, values: Sequence[float] | None, channels: int) -> list[float]:
    if values is None:
        raise DataError(f"{name}: data.{key} is missing; add per-channel {key} values to configs/data/{name}.yaml")
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise DataError(
            f"{name}: data.{key} has {len(vals)} values but the images have {channels} channels; "
            f"give one value or one per channel"
        )
    if key == "std" and any(v <= 0 for v in vals):
        raise DataError(f"{name}: data.std must be positive, got {vals}; fix data.std")
    return vals


def cache_root(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "normbench" / name


def user_root(cfg: Any) -> Path | None:
    root = opt(cfg, "root", None)
    if root is None or str(root) == "":
        return None
    return Path(str(root)).expanduser().absolute()


def download_lock(directory: Path):
    """An inter-process lock so that several torchrun ranks do not download into the same place at once."""
    from filelock import FileLock

    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory / ".download.lock"))
