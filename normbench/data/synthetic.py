"""Synthetic, learnable image classification data (no files, generated deterministically).

Each class has a smooth random prototype (a low-resolution random pattern, bilinearly upsampled);
an image is ``128 + amplitude * prototype[label] + noise`` clipped to uint8. The data depend only on
the config (``num_train``, ``num_eval``, ``image_size``, ``channels``, ``num_classes``, ``data_seed``),
not on the training seed, so runs with different seeds see the same data set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import DataError, mix_seed, opt, req

NAME = "synthetic"
AMPLITUDE = 80.0
NOISE = 40.0
PROTO_RES = 4
CHUNK = 4096


def generate(num: int, image_size: int, channels: int, num_classes: int, data_seed: int, offset: int = 0):
    """``num`` images (uint8 ``(num, C, S, S)``) and balanced labels, reproducible from the arguments."""
    g = torch.Generator().manual_seed(mix_seed(data_seed, 7919))
    protos = torch.rand(num_classes, channels, PROTO_RES, PROTO_RES, generator=g) * 2 - 1
    protos = F.interpolate(protos, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos = protos / protos.flatten(1).abs().amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    gl = torch.Generator().manual_seed(mix_seed(data_seed, 104729, offset))
    labels = torch.arange(num) % num_classes
    labels = labels[torch.randperm(num, generator=gl)]
    images = torch.empty(num, channels, image_size, image_size, dtype=torch.uint8)
    for start in range(0, num, CHUNK):
        stop = min(start + CHUNK, num)
        gn = torch.Generator().manual_seed(mix_seed(data_seed, 1299709, offset, start))
        noise = torch.randn(stop - start, channels, image_size, image_size, generator=gn)
        x = 128.0 + AMPLITUDE * protos[labels[start:stop]] + NOISE * noise
        images[start:stop] = x.round_().clamp_(0, 255).to(torch.uint8)
    return images, labels


def load(cfg) -> dict:
    num_train = int(req(cfg, "num_train", NAME))
    num_eval = int(req(cfg, "num_eval", NAME))
    size = int(req(cfg, "image_size", NAME))
    channels = int(req(cfg, "channels", NAME))
    classes = int(req(cfg, "num_classes", NAME))
    data_seed = int(opt(cfg, "data_seed", 0))
    if min(num_train, num_eval, size, channels) < 1 or classes < 2:
        raise DataError(
            f"{NAME}: need num_train, num_eval, image_size, channels >= 1 and num_classes >= 2, got "
            f"{num_train}, {num_eval}, {size}, {channels}, {classes}; fix configs/data/synthetic.yaml or the overrides"
        )
    tr = generate(num_train, size, channels, classes, data_seed, offset=0)
    ev = generate(num_eval, size, channels, classes, data_seed, offset=1)
    return dict(train=tr, eval=ev, num_classes=classes, in_channels=channels, image_size=size)
