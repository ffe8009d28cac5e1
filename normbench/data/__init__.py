"""normbench data layer: ``build_data(cfg.data, global_batch=..., rank=..., world_size=..., seed=..., device=...)``.

Per-GPU batch semantics: a training step consumes one *global* batch of ``global_batch`` images
(= gpus x per_gpu_batch); under torchrun each of the ``world_size`` processes gets every
``world_size``-th position of it (``global_batch // world_size`` images), which keeps each position on the same
emulated GPU whatever the world size. The global order and the augmentation only depend on
``(seed, epoch)``, so interleaving all ranks' batches gives the same global batch whatever the world size.
See :mod:`normbench.data.common` for the exact rule.
"""

from __future__ import annotations

import torch

from . import cifar, fashion_mnist, synthetic
from .common import (
    DataBundle,
    DataError,
    EvalLoader,
    TrainLoader,
    apply_train_subset,
    check_batch,
    epoch_images,
    epoch_permutation,
    opt,
    per_channel,
)
from .device_loader import build_device_loaders

__all__ = ["build_data", "DataBundle", "DataError", "TrainLoader", "EvalLoader", "DATASETS", "epoch_permutation"]

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")


def _small(name: str, cfg, loaded: dict, *, global_batch, rank, world_size, seed, device) -> DataBundle:
    tr_x, tr_y = loaded["train"]
    ev_x, ev_y = loaded["eval"]
    num_train = apply_train_subset(name, cfg, int(tr_y.shape[0]))
    tr_x, tr_y = tr_x[:num_train], tr_y[:num_train]
    check_batch(name, global_batch, rank, world_size, num_train)
    channels = loaded["in_channels"]
    aug = opt(cfg, "augment", {}) or {}
    padding = int(opt(aug, "crop_padding", 0))
    flip = bool(opt(aug, "flip", False))
    train, ev = build_device_loaders(
        name,
        tr_x,
        tr_y,
        ev_x,
        ev_y,
        padding=padding,
        flip=flip,
        mean=per_channel(name, "mean", opt(cfg, "mean", None), channels),
        std=per_channel(name, "std", opt(cfg, "std", None), channels),
        eval_batch=int(opt(cfg, "eval_batch", 1000)),
        global_batch=global_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        epoch_size=epoch_images(name, cfg, num_train, global_batch),
        rrc_scale=opt(aug, "rrc_scale", None),
        rrc_ratio=opt(aug, "rrc_ratio", (3 / 4, 4 / 3)),
    )
    return DataBundle(
        name=name,
        num_classes=loaded["num_classes"],
        in_channels=channels,
        image_size=loaded["image_size"],
        num_train=num_train,
        num_eval=int(ev_y.shape[0]),
        train=train,
        eval=ev,
    )


def build_data(
    cfg_data,
    *,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DataBundle:
    """Build the train/eval loaders of ``cfg_data.name`` for this rank (see module docstring)."""
    device = torch.device(device)
    name = opt(cfg_data, "name", None)
    if name not in DATASETS:
        raise DataError(
            f"unknown data set data.name={name!r}; choose one of {', '.join(DATASETS)} (configs/data/<name>.yaml)"
        )
    global_batch, rank, world_size, seed = int(global_batch), int(rank), int(world_size), int(seed)
    # Fail fast on the batch geometry before touching any file.
    check_batch(name, global_batch, rank, world_size, num_train=global_batch)
    kw = dict(global_batch=global_batch, rank=rank, world_size=world_size, seed=seed, device=device)
    if name == "imagenet":
        from . import imagenet

        parts = imagenet.build(cfg_data, **kw)
        return DataBundle(name=name, **parts)
    if name == "fashion_mnist":
        loaded = fashion_mnist.load(cfg_data)
    elif name in ("cifar10", "cifar100"):
        loaded = cifar.load(name, cfg_data)
    else:
        loaded = synthetic.load(cfg_data)
    return _small(name, cfg_data, loaded, **kw)
