"""Loaders for datasets that fit on the device (Fashion-MNIST, CIFAR, synthetic).

The whole dataset is kept on ``device`` as uint8 ``(N, C, H+2p, W+2p)`` -- already zero
padded by the crop padding ``p`` -- so that a training batch is produced by a handful of
batched kernels and no per-image Python work:

1. ``index_select`` of the batch's images (padded),
2. one ``gather`` over the flattened spatial dims with a precomputed index grid that does
   the random crop and the horizontal flip together,
3. ``float`` + per-channel affine normalization (``x * 1/(255 std) - mean/std``).

Eval batches are slices of the un-padded interior (no augmentation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .common import (
    STREAM_AUGMENT,
    DataError,
    epoch_generator,
    epoch_permutation,
    eval_shard,
    rank_slice,
)


def draw_augment_params(n: int, padding: int, flip: bool, seed: int, epoch: int):
    """Per-position crop offsets ``(oy, ox)`` in ``[0, 2p]`` and flip flags for one epoch (CPU).

    Drawn for the whole epoch order from a generator seeded by ``(seed, epoch)``, so they
    depend neither on the world size nor on the global torch RNG.
    """
    g = epoch_generator(seed, epoch, STREAM_AUGMENT)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    fl = torch.randint(0, 2, (n,), generator=g).bool()
    if not flip:
        fl = torch.zeros_like(fl)
    return oy, ox, fl


def crop_grids(h: int, w: int, wp: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index grids for :func:`gather_crop`: row offsets ``(H,)`` and column tables ``(2, W)`` (plain, flipped)."""
    ar_w = torch.arange(w, device=device)
    return torch.arange(h, device=device) * wp, torch.stack([ar_w, (w - 1) - ar_w])


def gather_crop(
    xpad: torch.Tensor, base: torch.Tensor, flip_idx: torch.Tensor, row_off: torch.Tensor, col_table: torch.Tensor
) -> torch.Tensor:
    """One gather: ``out[b, c, i, j] = xpad[b, c].flat[base[b] + row_off[i] + col_table[flip_idx[b], j]]``."""
    b, c, hp, wp = xpad.shape
    h, w = row_off.shape[0], col_table.shape[1]
    idx = (base.view(b, 1, 1) + row_off.view(1, h, 1)) + col_table.index_select(0, flip_idx).view(b, 1, w)
    return torch.gather(xpad.reshape(b, c, hp * wp), 2, idx.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


def crop_flip_padded(
    xpad: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, fl: torch.Tensor, padding: int
) -> torch.Tensor:
    """Batched random crop + horizontal flip of already padded images.

    ``xpad``: ``(B, C, H+2p, W+2p)``; returns ``(B, C, H, W)`` with
    ``out[b] = flip_if(fl[b], xpad[b, :, oy[b]:oy[b]+H, ox[b]:ox[b]+W])``.
    """
    _, _, hp, wp = xpad.shape
    row_off, col_table = crop_grids(hp - 2 * padding, wp - 2 * padding, wp, xpad.device)
    return gather_crop(xpad, oy * wp + ox, fl.long(), row_off, col_table)


def crop_flip(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, fl: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip of an un-padded uint8/float batch ``(B, C, H, W)``."""
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    return crop_flip_padded(x, oy, ox, fl, padding)


class Normalizer:
    """uint8 -> float32 ``(x/255 - mean)/std`` per channel, as one fused affine."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        mean_t = torch.tensor(mean, dtype=torch.float64)
        std_t = torch.tensor(std, dtype=torch.float64)
        self.scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(1, -1, 1, 1).to(device)
        self.bias = (-mean_t / std_t).to(torch.float32).view(1, -1, 1, 1).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x.to(torch.float32), self.scale)


class DeviceTrainLoader:
    """This rank's slice of each deterministic global batch, augmented on the device."""

    def __init__(
        self,
        images_padded: torch.Tensor,
        labels: torch.Tensor,
        *,
        padding: int,
        flip: bool,
        normalizer: Normalizer,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch_size: int | None = None,
    ):
        self.images = images_padded
        self.labels = labels
        self.padding = int(padding)
        self.flip = bool(flip)
        self.normalize = normalizer
        self.global_batch = int(global_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_batch = self.global_batch // self.world_size
        self.seed = int(seed)
        self.epoch = 0
        self.num_samples = int(labels.shape[0])
        self.steps_per_epoch = (epoch_size or self.num_samples) // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_plan(self):
        """(positions-ordered image indices, oy, ox, flip) for the whole epoch, on the device."""
        dev = self.images.device
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
        aug = None
        if self.padding or self.flip:
            oy, ox, fl = draw_augment_params(self.num_samples, self.padding, self.flip, self.seed, self.epoch)
            wp = self.images.shape[-1]
            aug = ((oy * wp + ox).to(dev), fl.long().to(dev))
        return perm.to(dev), aug

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm, aug = self.epoch_plan()
        g = self.global_batch
        p = self.padding
        hp, wp = self.images.shape[-2:]
        row_off, col_table = crop_grids(hp - 2 * p, wp - 2 * p, wp, self.images.device)
        for b in range(self.steps_per_epoch):
            pos = rank_slice(g, self.rank, self.world_size, step=b)
            idx = perm[pos]
            x = self.images.index_select(0, idx)
            if aug is not None:
                base, flip_idx = aug
                x = gather_crop(x, base[pos], flip_idx[pos], row_off, col_table)
            elif p:
                x = x[:, :, p:-p, p:-p]
            yield self.normalize(x), self.labels.index_select(0, idx)


class DeviceEvalLoader:
    """This rank's contiguous shard of the eval set, in order, no augmentation."""

    def __init__(
        self,
        images_padded: torch.Tensor,
        labels: torch.Tensor,
        *,
        padding: int,
        normalizer: Normalizer,
        batch_size: int,
        rank: int,
        world_size: int,
    ):
        if batch_size < 1:
            raise DataError(f"eval batch size {batch_size} must be positive; set data.eval_batch >= 1")
        self.images = images_padded
        self.labels = labels
        self.padding = int(padding)
        self.normalize = normalizer
        self.batch_size = int(batch_size)
        self.lo, self.hi = eval_shard(int(labels.shape[0]), rank, world_size)
        self.num_samples = self.hi - self.lo

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.padding
        for start in range(self.lo, self.hi, self.batch_size):
            stop = min(start + self.batch_size, self.hi)
            x = self.images[start:stop]
            if p:
                x = x[:, :, p:-p, p:-p]
            yield self.normalize(x), self.labels[start:stop]


def build_device_loaders(
    name: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    *,
    padding: int,
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
    eval_batch: int,
    global_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    epoch_size: int | None = None,
):
    """Move uint8 (N, C, H, W) CPU tensors to ``device`` (padded once) and wrap them in loaders."""
    if padding < 0:
        raise DataError(f"{name}: data.augment.crop_padding={padding} must be >= 0; fix the config")
    if train_images.dtype != torch.uint8 or eval_images.dtype != torch.uint8:
        raise DataError(f"{name}: images must be uint8; this is a bug in the {name} reader")
    norm = Normalizer(mean, std, device)

    def to_dev(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        if padding:
            x = F.pad(x, (padding, padding, padding, padding))
        return x.contiguous()

    tr_x = to_dev(train_images)
    ev_x = to_dev(eval_images)
    train = DeviceTrainLoader(
        tr_x,
        train_labels.to(device=device, dtype=torch.int64),
        padding=padding,
        flip=flip,
        normalizer=norm,
        global_batch=global_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch_size=epoch_size,
    )
    ev = DeviceEvalLoader(
        ev_x,
        eval_labels.to(device=device, dtype=torch.int64),
        padding=padding,
        normalizer=norm,
        batch_size=eval_batch,
        rank=rank,
        world_size=world_size,
    )
    return train, ev
