"""ImageNet (or any ImageFolder data set) at ``<root>/train`` and ``<root>/val``, via a DataLoader.

Train: RandomResizedCrop(image_size) + horizontal flip, then ToTensor, fb.resnet.torch's colour jitter and PCA
lighting (:mod:`normbench.data.colour`; ``data.augment.brightness/contrast/saturation/lighting``, 0 turns each
off) and Normalize(mean, std); eval: Resize(image_size*256/224) + CenterCrop(image_size) + ToTensor + Normalize.

Determinism: a batch sampler hands this rank its slice of each deterministic global batch (the
rule of :mod:`normbench.data.common`). Every training sample carries a seed drawn per epoch and
per *position* from a generator seeded by ``(seed, epoch)``; the transform runs with the CPU RNG
seeded from it (state saved and restored around it), so an image's augmentation depends neither
on the world size, nor on the number of workers, nor on which worker decodes it.

``data.decoder``: ``pil`` (the default) decodes and augments with PIL in the DataLoader workers; ``gpu`` has the
workers read raw bytes only and decodes + augments batched on the device (:mod:`normbench.data.gpu_decode`), with
the same per-position seeds and the same draws, so both decoders crop the same box, flip the same images and
give them the same colour jitter and lighting.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .colour import ColourAugment, ColourTransform
from .common import (
    STREAM_AUGMENT,
    DataError,
    apply_train_subset,
    check_batch,
    epoch_generator,
    epoch_images,
    epoch_permutation,
    eval_shard,
    mix_seed,
    opt,
    per_channel,
    rank_slice,
    user_root,
)

NAME = "imagenet"


class SeededTransformDataset(Dataset):
    """Wraps an ImageFolder (without transform); index is ``i`` or ``(i, transform_seed)``."""

    def __init__(self, folder, transform):
        self.folder = folder
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, None
        path, target = self.folder.samples[index]
        try:
            img = self.folder.loader(path)
        except (OSError, ValueError, SyntaxError) as err:  # PIL: truncated, empty or not an image
            raise DataError(
                f"{NAME}: cannot read image {path} ({' '.join(str(err).split())}); replace or remove that file"
            ) from None
        if seed is None:
            x = self.transform(img)
        else:
            # Seed only the CPU generator (torch.manual_seed would also reseed CUDA) and restore it,
            # so that with workers=0 the trainer's RNG stream is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(seed))
                x = self.transform(img)
        return x, target


class GlobalBatchSliceSampler(Sampler):
    """Yields, per step, this rank's slice of the global batch as ``[(index, transform_seed), ...]``."""

    def __init__(
        self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int, epoch_size: int | None = None
    ):
        self.num_samples = num_samples
        self.epoch_size = epoch_size or num_samples
        self.global_batch = global_batch
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_size // self.global_batch

    def __iter__(self) -> Iterator[list]:
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch).tolist()
        seeds = torch.randint(
            0, 2**62, (self.num_samples,), generator=epoch_generator(self.seed, self.epoch, STREAM_AUGMENT)
        ).tolist()
        g = self.global_batch
        for b in range(len(self)):
            pos = rank_slice(g, self.rank, self.world_size, step=b)
            yield [(perm[k], seeds[k]) for k in range(pos.start, pos.stop, pos.step)]


class ShardBatchSampler(Sampler):
    def __init__(self, lo: int, hi: int, batch_size: int):
        self.lo, self.hi, self.batch_size = lo, hi, batch_size

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.batch_size)

    def __iter__(self) -> Iterator[list]:
        for s in range(self.lo, self.hi, self.batch_size):
            yield list(range(s, min(s + self.batch_size, self.hi)))


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class _ToDevice:
    """Yields the loader's batches on ``device``; with ``decode`` (data.decoder=gpu) the loader yields raw bytes and
    ``decode`` (a gpu_decode.GpuDecodeBatches over the same loader) yields the decoded, transformed batches."""

    def __init__(self, loader: DataLoader, device: torch.device, decode=None):
        self.loader = loader
        self.device = device
        self.decode = decode

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.decode is not None:
            yield from self.decode
            return
        nb = self.device.type == "cuda"
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=nb), y.to(self.device, dtype=torch.int64, non_blocking=nb)


class ImageNetTrainLoader(_ToDevice):
    def __init__(
        self, loader: DataLoader, sampler: GlobalBatchSliceSampler, device: torch.device, local_batch: int, decode=None
    ):
        super().__init__(loader, device, decode)
        self.sampler = sampler
        self.global_batch = sampler.global_batch
        self.local_batch = local_batch
        self.steps_per_epoch = len(sampler)
        self.num_samples = sampler.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch


class ImageNetEvalLoader(_ToDevice):
    def __init__(self, loader: DataLoader, device: torch.device, num_samples: int, decode=None):
        super().__init__(loader, device, decode)
        self.num_samples = num_samples


def _image_folder(path: Path):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise DataError(
            f"{NAME}: {path} is not a usable ImageFolder ({type(e).__name__}: {e}); it needs one sub-directory of "
            "images per class"
        ) from None


def build(cfg, *, global_batch: int, rank: int, world_size: int, seed: int, device: torch.device) -> dict:
    from torchvision import transforms as T

    from .gpu_decode import GpuDecodeBatches, RawBytesDataset, check_decoder, collate_raw

    decoder = check_decoder(NAME, opt(cfg, "decoder", "pil"))
    root = user_root(cfg)
    if root is None:
        raise DataError(
            f"{NAME}: data.root is not set; set data.root to a directory with train/ and val/ ImageFolder "
            "sub-directories (one folder per class)"
        )
    if not (root / "train").is_dir():
        raise DataError(
            f"{NAME}: no train/ directory in {root}; set data.root to a directory with train/ and val/ ImageFolder "
            "sub-directories (one folder per class)"
        )
    if not (root / "val").is_dir():
        raise DataError(
            f"{NAME}: no val/ directory in {root}; put the validation images in {root}/val/<class>/ (the same class "
            "folders as train/)"
        )
    train_folder = _image_folder(root / "train")
    val_folder = _image_folder(root / "val")
    if val_folder.class_to_idx != train_folder.class_to_idx:
        raise DataError(
            f"{NAME}: {root}/val has {len(val_folder.classes)} class folders that differ from the "
            f"{len(train_folder.classes)} in train/; sort the validation images into the same class folders"
        )

    size = int(opt(cfg, "image_size", 224))
    resize = int(round(size * 256 / 224))
    mean = per_channel(NAME, "mean", opt(cfg, "mean", None), 3)
    std = per_channel(NAME, "std", opt(cfg, "std", None), 3)
    aug = opt(cfg, "augment", {}) or {}
    flip = bool(opt(aug, "flip", True))
    min_scale = float(opt(aug, "min_scale", 0.08))
    ratio = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's default
    colour = ColourAugment.from_config(NAME, aug)
    train_tf = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=ratio)]
    if flip:
        train_tf.append(T.RandomHorizontalFlip())
    train_tf.append(T.ToTensor())
    if colour.enabled:  # its draws follow the crop's and the flip's, as in gpu_decode.draw_crops
        train_tf.append(ColourTransform(colour))
    train_tf.append(T.Normalize(mean, std))
    eval_tf = [T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]

    num_train = apply_train_subset(NAME, cfg, len(train_folder))
    if num_train < len(train_folder):
        train_folder.samples = train_folder.samples[:num_train]
        train_folder.imgs = train_folder.samples
        train_folder.targets = train_folder.targets[:num_train]
    local_batch = check_batch(NAME, global_batch, rank, world_size, num_train)

    workers = int(opt(cfg, "workers", 0))
    eval_batch = int(opt(cfg, "eval_batch", 100))
    if workers < 0 or eval_batch < 1:
        raise DataError(
            f"{NAME}: data.workers={workers} and data.eval_batch={eval_batch} must be >= 0 and >= 1; fix the config"
        )
    gpu = decoder == "gpu"
    pin = device.type == "cuda" and not gpu  # gpu: decode_jpeg takes the bytes from (pageable) CPU memory
    common = dict(
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers > 0 else None,
    )

    sampler = GlobalBatchSliceSampler(
        num_train, global_batch, rank, world_size, seed, epoch_images(NAME, cfg, num_train, global_batch)
    )
    if gpu:
        common["collate_fn"] = collate_raw
    train_loader = DataLoader(
        RawBytesDataset(train_folder, NAME) if gpu else SeededTransformDataset(train_folder, T.Compose(train_tf)),
        batch_sampler=sampler,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank, 3)),
        **common,
    )
    lo, hi = eval_shard(len(val_folder), rank, world_size)
    eval_loader = DataLoader(
        RawBytesDataset(val_folder, NAME) if gpu else SeededTransformDataset(val_folder, T.Compose(eval_tf)),
        batch_sampler=ShardBatchSampler(lo, hi, eval_batch),
        **common,
    )
    train_decode = eval_decode = None
    if gpu:
        geometry = dict(size=size, resize=resize, mean=mean, std=std)
        train_aug = dict(scale=(min_scale, 1.0), ratio=ratio, flip=flip, colour=colour)
        train_decode = GpuDecodeBatches(train_loader, train_folder, device, NAME, aug=train_aug, **geometry)
        eval_decode = GpuDecodeBatches(eval_loader, val_folder, device, NAME, aug=None, **geometry)
    return dict(
        num_classes=len(train_folder.classes),
        in_channels=3,
        image_size=size,
        num_train=num_train,
        num_eval=len(val_folder),
        train=ImageNetTrainLoader(train_loader, sampler, device, local_batch, train_decode),
        eval=ImageNetEvalLoader(eval_loader, device, hi - lo, eval_decode),
    )
