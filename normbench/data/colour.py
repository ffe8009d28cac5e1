"""ImageNet colour augmentation as fb.resnet.torch (and the official GN reproductions after it) trains with:
colour jitter (brightness, contrast, saturation, in a random order per image) then PCA ("AlexNet-style") lighting
noise, on the crop's pixels in [0, 1] before mean/std normalization (docs/papers.md section 2).

With ``gray = 0.299 R + 0.587 G + 0.114 B`` and ``blend(x, other, a) = a x + (1 - a) other``, per image:

* brightness ``blend(x, 0, a)``, contrast ``blend(x, mean(gray), a)``, saturation ``blend(x, gray, a)``, each with
  ``a = 1 + U(-s, s)`` for its strength ``s``, applied in the order of a random permutation;
* lighting adds ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, std)`` per eigenvector, to every pixel's RGB.

No clamping, as in fb.resnet.torch. Without it the three blends commute (the grey weights sum to 1, so
saturation keeps an image's grey, and each blend is linear): the order changes the result only by rounding. It is
drawn and applied anyway, as fb.resnet.torch's procedure has it. The horizontal flip comes before the colour here
(fb.resnet.torch flips last): every operation is per pixel or uses the whole image's mean, so that is the same.

The draws (:func:`draw`) use the CPU default generator, which both ImageNet decoders have seeded from the image's
position seed just after its crop and flip draws: the same image gets the same colour whatever the decoder, world
size or workers. :func:`apply` is batched and device-agnostic (the PIL path runs it on one image, the gpu path on
the device batch). Each image's three blends and its lighting compose into one affine colour map
``y = M x + c`` (``M`` 3x3, ``c`` a colour; contrast's mean grey follows from the image's mean colour), so the
image is read once for its mean and once for the map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import DataError, opt

# fb.resnet.torch datasets/imagenet.lua: the PCA of ImageNet's RGB pixels (values in [0, 1]).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (  # rows R, G, B; column k is eigenvector k
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
LUMA = (0.299, 0.587, 0.114)  # fb.resnet.torch's grayscale (ITU-R BT.601)
JITTERS = ("brightness", "contrast", "saturation")  # the index a ColourDraw's order refers to
KEYS = (*JITTERS, "lighting")  # data.augment keys; 0 turns one off


@dataclass(frozen=True)
class ColourAugment:
    """Strengths: jitter factor ``1 + U(-s, s)`` for the three, the std of the lighting ``alpha``."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    lighting: float = 0.0

    @property
    def jitter(self) -> bool:
        return any(getattr(self, k) for k in JITTERS)

    @property
    def enabled(self) -> bool:
        return self.jitter or self.lighting > 0

    @classmethod
    def from_config(cls, name: str, augment) -> ColourAugment:
        values = {}
        for key in KEYS:
            value = opt(augment, key, 0)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            # a jitter factor 1 + U(-s, s) must stay >= 0; the lighting std only >= 0
            if not number or value < 0 or (key in JITTERS and value > 1):
                wants = "a number >= 0" if key == "lighting" else "a number in [0, 1]"
                raise DataError(
                    f"{name}: data.augment.{key}={value!r} must be {wants}; e.g. data.augment.{key}="
                    f"{'0.1' if key == 'lighting' else '0.4'} (fb.resnet.torch's), or 0 to turn it off"
                )
            values[key] = float(value)
        return cls(**values)


@dataclass(frozen=True)
class ColourDraw:
    """One image's draws: ``order`` (indices into JITTERS, applied first to last), the blend ``factors`` (one
    per JITTERS entry) and the lighting ``shift`` added to R, G, B."""

    order: tuple[int, int, int]
    factors: tuple[float, float, float]
    shift: tuple[float, float, float]


def draw(colour: ColourAugment) -> ColourDraw | None:
    """The draws from the CPU default generator, in this order: ``randperm(3)``, ``rand(3)`` (when any jitter is
    on), ``randn(3)`` (when lighting is on). A strength of 0 gives a factor of exactly 1: that blend is the
    identity wherever it falls in the order, as fb.resnet.torch's leaving it out of the permutation."""
    if not colour.enabled:
        return None
    order, factors, shift = (0, 1, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    if colour.jitter:
        order = tuple(torch.randperm(3).tolist())
        u = torch.rand(3, dtype=torch.float64).tolist()
        factors = tuple(
            1.0 + s * (2.0 * v - 1.0) for s, v in zip((colour.brightness, colour.contrast, colour.saturation), u)
        )
    if colour.lighting > 0:
        alpha = (torch.randn(3, dtype=torch.float64) * colour.lighting).tolist()
        shift = tuple(sum(PCA_EIGVEC[i][k] * alpha[k] * PCA_EIGVAL[k] for k in range(3)) for i in range(3))
    return ColourDraw(order, factors, shift)


def colour_maps(draws: list[ColourDraw], mean_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image the affine map ``(M, c)`` (``(B, 3, 3)``, ``(B, 3)``, float64 on ``mean_rgb``'s device) that the
    blends then the lighting compose to, given each image's mean colour ``mean_rgb`` (``(B, 3)``).

    A blend with factor ``a`` is ``x -> T x + o 1`` with ``T = a I + (1 - a) 1 w^T`` for saturation (``w`` =
    LUMA) and ``a I`` otherwise, and ``o = (1 - a) w^T mbar`` for contrast (``mbar``: the mean colour of the image
    as it stands at that point, which follows the same map) and 0 otherwise."""
    device = mean_rgb.device
    n = len(draws)
    f64 = dict(dtype=torch.float64, device=device)
    order = torch.tensor([d.order for d in draws], dtype=torch.int64, device=device)  # (B, 3)
    factors = torch.tensor([d.factors for d in draws], **f64)  # (B, 3)
    shift = torch.tensor([d.shift for d in draws], **f64)
    w = torch.tensor(LUMA, **f64)
    eye = torch.eye(3, **f64)
    ones_w = torch.ones(3, 1, **f64) * w.view(1, 3)  # 1 w^T: every channel takes the grey
    M = eye.expand(n, 3, 3).clone()
    c = torch.zeros(n, 3, **f64)
    mbar = mean_rgb.to(torch.float64)
    for step in range(3):
        op = order[:, step]
        a = factors.gather(1, op.view(n, 1)).view(n, 1, 1)
        saturation = (op == JITTERS.index("saturation")).to(torch.float64).view(n, 1, 1)
        contrast = (op == JITTERS.index("contrast")).to(torch.float64).view(n, 1)
        T = a * eye + (1 - a) * saturation * ones_w
        offset = (1 - a.view(n, 1)) * contrast * (mbar @ w).view(n, 1)  # the same for R, G, B
        M = T @ M
        c = (T @ c.unsqueeze(-1)).squeeze(-1) + offset
        mbar = (T @ mbar.unsqueeze(-1)).squeeze(-1) + offset
    return M, c + shift


def apply(x: torch.Tensor, draws: list[ColourDraw]) -> torch.Tensor:
    """Colour-augment a float batch ``(B, 3, H, W)`` of pixels in [0, 1] (a new tensor, ``x``'s dtype)."""
    M, c = colour_maps(draws, x.mean(dim=(2, 3), dtype=torch.float64))
    M, c = M.to(x.dtype), c.to(x.dtype)
    # Three broadcast multiply-adds rather than a matmul: no TF32 on CUDA, the same arithmetic on every device.
    y = c.view(-1, 3, 1, 1) + M[:, :, 0, None, None] * x[:, 0:1]
    y += M[:, :, 1, None, None] * x[:, 1:2]
    y += M[:, :, 2, None, None] * x[:, 2:3]
    return y


class ColourTransform:
    """The PIL path's transform, after ToTensor (a ``(3, H, W)`` float image in [0, 1]): draws then applies."""

    def __init__(self, colour: ColourAugment):
        self.colour = colour

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = draw(self.colour)
        return x if d is None else apply(x.unsqueeze(0), [d])[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.colour})"
