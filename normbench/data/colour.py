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
size or workers. Each image's three blends and its lighting compose into one affine colour map ``y = M x + c``
(``M`` 3x3; ``c`` a colour, affine in the image's mean colour through contrast's mean grey), computed from the
draws on the host (:func:`colour_maps`, batched), so the image is read once for its mean and once for the map:
:func:`apply` on a device batch (the gpu path's, with no host sync), :class:`ColourTransform` on one image (the
PIL path's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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


def colour_maps(draws: list[ColourDraw]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image the affine map the blends then the lighting compose to, from the draws alone (on the host, float64):
    ``(M, K, c)`` of shapes ``(B, 3, 3)``, ``(B, 3, 3)``, ``(B, 3)`` with ``y = M x + K mean(x) + c`` for every
    pixel ``x`` and the image's mean colour ``mean(x)``.

    Every blend is ``x -> a x + s (1 - a) grey(x) 1 + t (1 - a) grey(mean) 1`` (``s``: saturation, ``t``:
    contrast, ``grey(v) = w^T v``, ``w`` = LUMA), so the map after any number of them stays
    ``alpha x + beta grey(x) 1 + kappa grey(mean(x)) 1``; since ``w^T 1 = 1``, a blend after it gives, in the
    drawn order, ``alpha' = a alpha``, ``beta' = a beta + s (1 - a)(alpha + beta)`` and
    ``kappa' = (a + s (1 - a)) kappa + t (1 - a)(alpha + beta + kappa)``: three scalars an image."""
    n = len(draws)
    alpha, beta, kappa = np.ones(n), np.zeros(n), np.zeros(n)
    saturation, contrast = JITTERS.index("saturation"), JITTERS.index("contrast")
    for i, d in enumerate(draws):
        al, be, ka = 1.0, 0.0, 0.0
        for op in d.order:
            a = d.factors[op]
            s = (1 - a) if op == saturation else 0.0
            t = (1 - a) if op == contrast else 0.0
            al, be, ka = a * al, a * be + s * (al + be), (a + s) * ka + t * (al + be + ka)
        alpha[i], beta[i], kappa[i] = al, be, ka
    grey_rows = np.outer(np.ones(3), LUMA)  # 1 w^T: every channel takes the grey
    M = alpha[:, None, None] * np.eye(3) + beta[:, None, None] * grey_rows
    K = kappa[:, None, None] * grey_rows
    return M, K, np.array([d.shift for d in draws], dtype=np.float64).reshape(n, 3)


def apply(x: torch.Tensor, draws: list[ColourDraw], matmul: bool | None = None) -> torch.Tensor:
    """Colour-augment a float batch ``(B, 3, H, W)`` of pixels in [0, 1] on any device (a new tensor, ``x``'s
    dtype). The maps come from the host without waiting on the device (non-blocking copies); only the images'
    mean colours are computed where the images are."""
    M, K, c = (torch.from_numpy(a).to(x.device, non_blocking=True) for a in colour_maps(draws))
    mean = x.mean(dim=(2, 3)).to(torch.float64)
    offset = (c + (K * mean.unsqueeze(1)).sum(-1)).to(x.dtype)  # c + K mean(x)
    M = M.to(x.dtype)
    if x.device.type == "cpu" if matmul is None else matmul:  # one matmul pass (no TF32 on the CPU)
        return torch.baddbmm(offset.unsqueeze(-1), M, x.reshape(len(x), 3, -1)).view(x.shape)
    # elsewhere three broadcast multiply-adds: a CUDA matmul could run in TF32 (torch's allow_tf32)
    y = offset.view(-1, 3, 1, 1) + M[:, :, 0, None, None] * x[:, 0:1]
    y += M[:, :, 1, None, None] * x[:, 1:2]
    y += M[:, :, 2, None, None] * x[:, 2:3]
    return y


class ColourTransform:
    """The PIL path's transform, after ToTensor (a ``(3, H, W)`` float image in [0, 1]): draws then applies."""

    def __init__(self, colour: ColourAugment):
        self.colour = colour

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = draw(self.colour)
        if d is None:
            return x
        (M,), (K,), (c,) = colour_maps([d])
        offset = c + K @ x.mean(dim=(1, 2)).double().numpy()
        # a CPU matmul (no TF32 there): one pass over the image
        M, offset = torch.from_numpy(M).to(x.dtype), torch.from_numpy(offset).to(x.dtype)
        return torch.addmm(offset.view(3, 1), M, x.reshape(3, -1)).view(x.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.colour})"
