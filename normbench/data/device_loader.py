"""Loaders for datasets that fit on the device (Fashion-MNIST, CIFAR, synthetic).

The whole dataset is kept on ``device`` as uint8 ``(N, C, H+2p, W+2p)`` -- already zero
padded by the crop padding ``p`` -- so that a training batch is produced by a handful of
batched kernels and no per-image Python work:

1. ``index_select`` of the batch's images (padded),
2. one ``gather`` over the flattened spatial dims with a precomputed index grid that does
   the random crop and the horizontal flip together,
3. ``float`` + per-channel affine normalization (``x * 1/(255 std) - mean/std``).

With ``rrc_scale`` set, step 2 is instead ImageNet's random-resized crop (torchvision's
``RandomResizedCrop`` box rule: an area fraction in ``rrc_scale``, a log-uniform aspect ratio in
``rrc_ratio``), resized back to ``H x W`` bilinearly, with the flip: two batched matmuls with per-image
interpolation matrices (bilinear resizing is separable), so still no per-image Python work.

Eval batches are slices of the un-padded interior (no augmentation).
"""

from __future__ import annotations

import math
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


RRC_TRIES = 10  # torchvision's RandomResizedCrop.get_params tries 10 boxes before its fallback


def draw_rrc_params(n: int, height: int, width: int, scale, ratio, flip: bool, seed: int, epoch: int):
    """Per-position random-resized-crop boxes ``(top, left, h, w)`` (int64) and flip flags for one epoch (CPU).

    torchvision's ``RandomResizedCrop.get_params`` rule, vectorized: up to 10 tries of an area
    ``uniform(scale) x H x W`` and an aspect ratio ``exp(uniform(log ratio))``, rounded to integer sides; the
    first try that fits is kept, at a uniform integer offset; if none fits, the centre crop of the whole image
    clipped to the ratio range. Drawn from the ``(seed, epoch)`` augmentation stream like
    :func:`draw_augment_params`, so an image's box depends on its position in the epoch, not the world size.
    """
    g = epoch_generator(seed, epoch, STREAM_AUGMENT)
    area = float(height * width)
    lo_s, hi_s = float(scale[0]), float(scale[1])
    lo_r, hi_r = math.log(float(ratio[0])), math.log(float(ratio[1]))
    target = area * (lo_s + (hi_s - lo_s) * torch.rand(n, RRC_TRIES, generator=g, dtype=torch.float64))
    aspect = torch.exp(lo_r + (hi_r - lo_r) * torch.rand(n, RRC_TRIES, generator=g, dtype=torch.float64))
    w_try = torch.round(torch.sqrt(target * aspect)).long()
    h_try = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    first = torch.where(fits.any(1), fits.long().argmax(1), torch.full((n,), -1))
    # Fallback (no try fits): the whole image, clipped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < float(ratio[0]):
        fb_w, fb_h = width, int(round(width / float(ratio[0])))
    elif in_ratio > float(ratio[1]):
        fb_w, fb_h = int(round(height * float(ratio[1]))), height
    else:
        fb_w, fb_h = width, height
    pick = first.clamp(min=0).view(n, 1)
    ok = first >= 0
    h = torch.where(ok, h_try.gather(1, pick).view(n), torch.full((n,), fb_h))
    w = torch.where(ok, w_try.gather(1, pick).view(n), torch.full((n,), fb_w))
    # Uniform integer offsets in [0, H - h] and [0, W - w] (torch.randint takes one bound for all draws).
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.where(ok, (u[:, 0] * (height - h + 1)).floor().long(), torch.full((n,), (height - fb_h) // 2))
    left = torch.where(ok, (u[:, 1] * (width - w + 1)).floor().long(), torch.full((n,), (width - fb_w) // 2))
    fl = torch.randint(0, 2, (n,), generator=g).bool()
    if not flip:
        fl = torch.zeros_like(fl)
    return top, left, h, w, fl


def resize_matrices(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """``(B, out_size, in_size)`` matrices ``R`` such that ``R[b] @ v`` is the 1-D bilinear resize
    (``F.interpolate(..., mode="bilinear", align_corners=False)``) of ``v[start[b]:start[b]+length[b]]``
    to ``out_size`` samples: source ``(o + 0.5) x length / out_size - 0.5``, clamped to the crop."""
    dev = start.device
    o = torch.arange(out_size, device=dev, dtype=torch.float32).view(1, -1)
    lf = length.to(torch.float32).view(-1, 1)
    src = ((o + 0.5) * lf / out_size - 0.5).clamp(min=0.0)
    i0 = src.floor()
    frac = src - i0
    i0 = torch.minimum(i0.long(), length.view(-1, 1) - 1)
    i1 = torch.minimum(i0 + 1, length.view(-1, 1) - 1)
    base = start.view(-1, 1)
    r = torch.zeros(start.shape[0], out_size, in_size, device=dev, dtype=torch.float32)
    r.scatter_add_(2, (base + i0).unsqueeze(2), (1.0 - frac).unsqueeze(2))
    r.scatter_add_(2, (base + i1).unsqueeze(2), frac.unsqueeze(2))
    return r


def resized_crop_flip(x: torch.Tensor, top, left, h, w, fl, out_h: int, out_w: int) -> torch.Tensor:
    """Batched crop of ``x[b, :, top:top+h, left:left+w]``, bilinear resize to ``out_h x out_w`` and
    horizontal flip where ``fl``: ``out[b] = Ry[b] @ x[b] @ Rx[b]^T`` (float32 out, any input dtype)."""
    ry = resize_matrices(top, h, out_h, x.shape[-2])
    rx = resize_matrices(left, w, out_w, x.shape[-1])
    rx = torch.where(fl.view(-1, 1, 1), rx.flip(1), rx)  # flipping the output = reversing Rx's rows
    return ry.unsqueeze(1) @ x.to(torch.float32) @ rx.unsqueeze(1).transpose(-1, -2)


def check_rrc(name: str, scale, ratio, padding: int):
    """Validate ``data.augment.rrc_scale`` / ``rrc_ratio``; returns them as float pairs (or None)."""
    if scale is None:
        return None
    try:
        s = (float(scale[0]), float(scale[1]))
        r = (float(ratio[0]), float(ratio[1]))
        if len(scale) != 2 or len(ratio) != 2:
            raise ValueError
    except (TypeError, ValueError, IndexError, KeyError):
        raise DataError(
            f"{name}: data.augment.rrc_scale={scale!r} / rrc_ratio={ratio!r} must be pairs [lo, hi], "
            f"e.g. rrc_scale=[0.08,1.0] rrc_ratio=[0.75,1.3333]; fix the config"
        ) from None
    if not (0.0 < s[0] <= s[1] <= 1.0 and 0.0 < r[0] <= r[1]):
        raise DataError(
            f"{name}: data.augment.rrc_scale={list(s)} must satisfy 0 < lo <= hi <= 1 and rrc_ratio="
            f"{list(r)} 0 < lo <= hi; fix the config"
        )
    if padding:
        raise DataError(
            f"{name}: data.augment.rrc_scale (random-resized crop) replaces the padded random crop; "
            f"set data.augment.crop_padding=0 with it"
        )
    return s, r


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
        rrc: tuple[tuple[float, float], tuple[float, float]] | None = None,
    ):
        self.images = images_padded
        self.rrc = rrc
        self.labels = labels
        self.padding = int(padding)
        self.flip = bool(flip)
        self.normalize = normalizer
        self.global_batch = int(global_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_batch = self.global_batch // self.world_size
        self.seed = int(seed)
        self.epoch = self.start_step = 0
        self.num_samples = int(labels.shape[0])
        self.steps_per_epoch = (epoch_size or self.num_samples) // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch the next iteration yields, from step ``start_step`` on (a resumed step checkpoint); the
        batches are the same ones an iteration from step 0 yields there."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_plan(self):
        """(positions-ordered image indices, augmentation parameters) for the whole epoch, on the device:
        ``(base, flip)`` for the padded crop, ``(top, left, h, w, flip)`` for the random-resized crop."""
        dev = self.images.device
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
        aug = None
        if self.rrc is not None:
            hp, wp = self.images.shape[-2:]
            p = self.padding  # 0: check_rrc rejects a padding with the random-resized crop
            params = draw_rrc_params(
                self.num_samples, hp - 2 * p, wp - 2 * p, *self.rrc, self.flip, self.seed, self.epoch
            )
            aug = tuple(t.to(dev) for t in params)
        elif self.padding or self.flip:
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
        start, self.start_step = self.start_step, 0  # once: a later pass (PreciseBN's) starts at step 0
        for b in range(start, self.steps_per_epoch):
            pos = rank_slice(g, self.rank, self.world_size, step=b)
            idx = perm[pos]
            x = self.images.index_select(0, idx)
            if self.rrc is not None:
                top, left, h, w, fl = (t[pos] for t in aug)
                x = resized_crop_flip(x, top, left, h, w, fl, hp, wp)
            elif aug is not None:
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
    rrc_scale=None,
    rrc_ratio=(3 / 4, 4 / 3),
):
    """Move uint8 (N, C, H, W) CPU tensors to ``device`` (padded once) and wrap them in loaders."""
    if padding < 0:
        raise DataError(f"{name}: data.augment.crop_padding={padding} must be >= 0; fix the config")
    if train_images.dtype != torch.uint8 or eval_images.dtype != torch.uint8:
        raise DataError(f"{name}: images must be uint8; this is a bug in the {name} reader")
    rrc = check_rrc(name, rrc_scale, rrc_ratio, padding)
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
        rrc=rrc,
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
