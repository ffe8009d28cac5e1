"""``data.decoder=gpu``: ImageNet with the JPEG decoding and the augmentation done batched on the device.

DataLoader workers only read each file's bytes (a uint8 tensor) and its label. The main process then decodes the
batch with one ``torchvision.io.decode_jpeg(list_of_byte_tensors, device=...)`` call -- nvJPEG's batched decode on
CUDA, libjpeg-turbo on the CPU (the same function, so the CPU tests run this code) -- and crops, flips, resizes and
normalizes on the device:

* train: ``RandomResizedCrop(image_size, scale=(min_scale, 1))`` + horizontal flip + colour jitter and lighting
  (:mod:`normbench.data.colour`), drawn exactly as the PIL path draws them: torchvision's
  ``RandomResizedCrop.get_params``, ``RandomHorizontalFlip``'s ``torch.rand(1) < 0.5``, then ``colour.draw``,
  with the CPU generator seeded from the position's seed (the same per-position seed as the PIL path, see
  :mod:`normbench.data.imagenet`). So an image gets the same crop box, flip and colour from both decoders,
  whatever the number of processes or workers and whatever device decodes it. Each crop is resized with
  torchvision's tensor ``resized_crop`` (bilinear, antialiased, rounded to uint8 as PIL does), then the batch is
  flipped, colour-augmented (``colour.apply``, batched) and normalized in one go;
* eval: ``Resize(image_size*256/224)`` (shorter side) + ``CenterCrop(image_size)``, as the PIL path.

The pixels differ from the PIL path's only by the resampling (PIL's fixed-point antialiased bilinear against torch's
float one: about 1/255) and, on CUDA, by nvJPEG's IDCT against libjpeg-turbo's; that is why ``data.decoder`` is part
of a run's identity (``normbench.runs``). Files that are not JPEGs (ImageNet's train set holds one PNG and a few
CMYK JPEGs; decode_jpeg's RGB mode converts CMYK and grayscale) are decoded on the CPU by
``torchvision.io.decode_image`` and moved to the device. A file nothing can decode is a one-line DataError naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .colour import ColourAugment, ColourDraw
from .colour import apply as apply_colour
from .colour import draw as draw_colour
from .common import DataError

DECODERS = ("pil", "gpu")
JPEG_MAGIC = b"\xff\xd8\xff"


def check_decoder(name: str, decoder) -> str:
    if decoder not in DECODERS:
        raise DataError(
            f"{name}: data.decoder={decoder!r} is not one of {', '.join(DECODERS)}; set data.decoder=pil (PIL in "
            "DataLoader workers) or data.decoder=gpu (batched decode and augmentation on the device)"
        )
    return decoder


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


class RawBytesDataset(torch.utils.data.Dataset):
    """An ImageFolder's files as raw bytes: ``key`` is ``i`` or ``(i, transform_seed)``; an item is
    ``(uint8 bytes, target, i, seed or None)``."""

    def __init__(self, folder, name: str):
        self.folder, self.name = folder, name

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, target = self.folder.samples[index]
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as err:
            raise DataError(
                f"{self.name}: cannot read image {path} ({_one_line(err)}); replace or remove that file"
            ) from None
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return raw, target, index, seed


def collate_raw(items):
    """One byte buffer per batch (and the files' lengths): a worker hands the main process two tensors, not one
    shared-memory segment per file (256 of those per batch cost more than the decode)."""
    data, targets, indices, seeds = zip(*items)
    lengths = torch.tensor([d.numel() for d in data], dtype=torch.int64)
    return torch.cat(data), lengths, torch.tensor(targets, dtype=torch.int64), list(indices), list(seeds)


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bytes(data[:3].tolist()) == JPEG_MAGIC


def decode_batch(datas: Sequence[torch.Tensor], paths: Sequence[str], device: torch.device, name: str):
    """Decode every file to a ``(3, H, W)`` uint8 RGB tensor on ``device``: the JPEGs in one batched decode_jpeg
    call, anything else (PNG, ...) by decode_image on the CPU. When the batched call fails the JPEGs are decoded one
    by one, and one that decode_jpeg rejects gets decode_image on the CPU too; a file that cannot be decoded at all
    raises a one-line DataError naming it."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    rgb = ImageReadMode.RGB
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpegs = [k for k, d in enumerate(datas) if _is_jpeg(d)]

    def bad(k: int, err: BaseException):
        return DataError(f"{name}: cannot decode image {paths[k]} ({_one_line(err)}); replace or remove that file")

    if jpegs:
        try:
            decoded = decode_jpeg([datas[k] for k in jpegs], mode=rgb, device=device)
        except RuntimeError:
            decoded = None  # some file is corrupt: decode one by one to name it
        if decoded is None:
            decoded = []
            for k in jpegs:
                try:
                    decoded.append(decode_jpeg(datas[k], mode=rgb, device=device))
                except RuntimeError:
                    decoded.append(None)  # corrupt, or a JPEG flavour nvJPEG declines: decode_image below
        for k, image in zip(jpegs, decoded):
            out[k] = image
    for k, d in enumerate(datas):
        if out[k] is None:
            try:
                if d.numel() == 0:
                    raise RuntimeError("empty file")
                out[k] = decode_image(d, mode=rgb).to(device)
            except RuntimeError as err:
                raise bad(k, err) from None
    return out


class TrainDraw(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    flipped: bool
    colour: ColourDraw | None = None  # None: no colour augmentation


def draw_crops(
    sizes: Sequence[tuple[int, int]],
    seeds: Sequence[int],
    scale,
    ratio,
    flip: bool,
    colour: ColourAugment | None = None,
) -> list[TrainDraw]:
    """A TrainDraw per image of size ``(H, W)``: torchvision's RandomResizedCrop parameters, RandomHorizontalFlip's
    draw, then the colour draws (colour.draw), with the CPU generator seeded from the image's position seed -- the
    draws the PIL path makes in that order (imagenet.SeededTransformDataset) -- and the caller's RNG state
    restored."""
    from torchvision.transforms import RandomResizedCrop

    scale, ratio = list(scale), list(ratio)
    params = []
    with torch.random.fork_rng(devices=[]):
        for (h, w), seed in zip(sizes, seeds):
            torch.default_generator.manual_seed(int(seed))
            # get_params only reads the shape: an expanded 1-element tensor stands in for the image
            top, left, ch, cw = RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(1, h, w), scale, ratio)
            flipped = bool(torch.rand(1) < 0.5) if flip else False
            params.append(TrainDraw(top, left, ch, cw, flipped, draw_colour(colour) if colour is not None else None))
    return params


def normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, colour_draws=None) -> torch.Tensor:
    """uint8 ``(B, 3, S, S)`` -> ToTensor (+ the colour augmentation when ``colour_draws``) + Normalize, in
    float32."""
    x = batch.float().div_(255.0)
    if colour_draws is not None:
        x = apply_colour(x, colour_draws)
    return x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


def train_batch(images, params: Sequence[TrainDraw], size: int, mean, std) -> torch.Tensor:
    from torchvision.transforms import functional as TF

    crops = [
        TF.resized_crop(img, p.top, p.left, p.height, p.width, [size, size], antialias=True)
        for img, p in zip(images, params)
    ]
    batch = torch.stack(crops)
    flipped = torch.tensor([p.flipped for p in params], dtype=torch.bool).to(batch.device, non_blocking=True)
    batch = torch.where(flipped.view(-1, 1, 1, 1), batch.flip(-1), batch)
    colour = [p.colour for p in params]
    return normalize(batch, mean, std, colour if all(d is not None for d in colour) else None)


def eval_batch(images, resize: int, size: int, mean, std) -> torch.Tensor:
    from torchvision.transforms import functional as TF

    crops = [TF.center_crop(TF.resize(img, [resize], antialias=True), [size, size]) for img in images]
    return normalize(torch.stack(crops), mean, std)


class GpuDecodeBatches:
    """Iterates a DataLoader of raw bytes (collate_raw) and yields ``(images, labels)`` decoded and transformed on
    ``device``: train (crop/flip drawn from each position's seed) or eval (resize + center crop)."""

    def __init__(self, loader, folder, device: torch.device, name: str, *, size: int, resize: int, mean, std, aug):
        self.loader, self.folder, self.device, self.name = loader, folder, device, name
        self.size, self.resize = size, resize
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.aug = aug  # None for eval, else dict(scale=, ratio=, flip=, colour=ColourAugment)

    def __len__(self) -> int:
        return len(self.loader)

    def transform(self, datas, indices, seeds) -> torch.Tensor:
        paths = [self.folder.samples[i][0] for i in indices]
        images = decode_batch(datas, paths, self.device, self.name)
        if self.aug is None:
            return eval_batch(images, self.resize, self.size, self.mean, self.std)
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        aug = self.aug
        colour = aug.get("colour")
        params = draw_crops(
            sizes, seeds, aug["scale"], aug["ratio"], aug["flip"], colour if colour and colour.enabled else None
        )
        return train_batch(images, params, self.size, self.mean, self.std)

    def __iter__(self):
        nb = self.device.type == "cuda"
        for buffer, lengths, targets, indices, seeds in self.loader:
            datas = list(torch.split(buffer, lengths.tolist()))
            yield self.transform(datas, indices, seeds), targets.to(self.device, non_blocking=nb)
