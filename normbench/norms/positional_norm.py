"""Positional Normalization (PONO, Li et al. 2019) and the Moment Shortcut.

PONO normalizes over the channels at each position (n, h, w), following the official PyTorch code:
    mean = mean_c x,   std = sqrt(var_c(x, unbiased) + eps),   x_hat = (x - mean) / std
(unbiased variance over C, eps inside the square root), then an optional per-channel affine
``x_hat * weight + bias``. The moments (N, 1, H, W) are kept on ``.last_mean`` / ``.last_std`` after every
forward (still attached to the graph) for a :class:`MomentShortcut` later in the network, and
``return_moments=True`` makes forward return ``(y, mean, std)``. Unbiased variance over C needs C >= 2.

MomentShortcut: ``y = x * std + mean`` (gamma = std, beta = mean of the encoder PONO of the same resolution).
DynamicMomentShortcut: a small conv net maps ``cat(mean, std)`` to ``(beta, gamma)``; ``y = x * gamma + beta``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (add_affine, NormConfigError, NormLayer, check_bool, check_channels, check_eps,
                      check_input, check_int)

__all__ = ["PositionalNorm", "MomentShortcut", "DynamicMomentShortcut", "pono_moments"]


def pono_moments(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(mean, std) over dim 1, keepdim; std = sqrt(unbiased var + eps) (official PONO code)."""
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=1)
        return mean, torch.sqrt(var + eps)
    # CPU: two passes are ~10x faster than CPU var_mean's Welford and as stable
    mean = x.mean(1, keepdim=True)
    d = x - mean
    var = (d * d).sum(1, keepdim=True) / (x.shape[1] - 1)
    return mean, torch.sqrt(var + eps)


class PositionalNorm(NormLayer, nn.Module):
    """``pono``: Positional Norm over C at each (n, h, w); per-channel affine when ``affine=True``."""

    norm_name = "pono"

    @staticmethod
    def check_options(affine=True, eps=1e-5, return_moments=False, _layer="pono"):
        check_bool(_layer, "affine", affine)
        check_eps(_layer, eps)
        check_bool(_layer, "return_moments", return_moments)

    def __init__(self, num_channels: int, affine: bool = True, eps: float = 1e-5, return_moments: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.check_options(affine, eps, return_moments)
        num_channels = check_channels(self.norm_name, num_channels)
        if num_channels < 2:
            raise NormConfigError(
                f"pono: num_channels={num_channels} leaves the unbiased variance over channels undefined; "
                f"PONO needs num_channels >= 2")
        self.num_channels = self.num_features = num_channels
        self.eps = float(eps)
        self.affine = affine
        self.return_moments = return_moments
        fk = {"device": device, "dtype": dtype}
        if affine:
            add_affine(self, num_channels, **fk)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.last_mean: Tensor | None = None
        self.last_std: Tensor | None = None

    def extra_repr(self) -> str:
        return f"{self.num_channels}, affine={self.affine}, eps={self.eps}, return_moments={self.return_moments}"

    def forward(self, x: Tensor):
        check_input(self.norm_name, x, self.num_channels)
        mean, std = pono_moments(x, self.eps)
        y = (x - mean) / std
        if self.affine:
            C = self.num_channels
            y = torch.addcmul(self.bias.view(1, C, 1, 1), y, self.weight.view(1, C, 1, 1))
        self.last_mean, self.last_std = mean, std
        if self.return_moments:
            return y, mean, std
        return y


def _moments(layer: str, source, mean: Tensor | None, std: Tensor | None) -> tuple[Tensor, Tensor]:
    """The explicit (mean, std), or the latest ones of the PONO layer a shortcut was built with."""
    if mean is None or std is None:
        pono = source[0]
        if pono is None or pono.last_mean is None:
            raise NormConfigError(f"{layer}: no moments; pass mean and std, or build the shortcut with its PONO "
                                  "layer and run that layer's forward first")
        mean = pono.last_mean if mean is None else mean
        std = pono.last_std if std is None else std
    return mean, std


class MomentShortcut(nn.Module):
    """``y = x * std + mean``. Pass ``mean``/``std`` explicitly, or give the PONO layer whose latest moments
    to use (held by reference, NOT registered as a submodule, so parameters are not duplicated)."""

    def __init__(self, pono: PositionalNorm | None = None):
        super().__init__()
        self.__dict__["_source"] = (pono,)

    def forward(self, x: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        mean, std = _moments("ms", self.__dict__["_source"], mean, std)
        return torch.addcmul(mean, x, std)


class DynamicMomentShortcut(nn.Module):
    """Dynamic Moment Shortcut: ``(beta, gamma) = net(cat(mean, std))``, ``y = x * gamma + beta``.

    ``net`` = conv(2 -> hidden, k) -> ReLU -> conv(hidden -> 2 * out, k) with ``out = num_channels`` when
    ``per_channel`` else 1 (broadcast over channels). The last conv is zero-initialized with bias giving
    gamma = 1, beta = 0, so it starts as the identity.
    """

    def __init__(self, num_channels: int, hidden_channels: int = 32, kernel_size: int = 3,
                 per_channel: bool = True, pono: PositionalNorm | None = None):
        super().__init__()
        check_channels("dms", num_channels)
        check_int("dms", "hidden_channels", hidden_channels, minimum=1)
        check_int("dms", "kernel_size", kernel_size, minimum=1)
        if kernel_size % 2 == 0:
            raise NormConfigError(f"dms: kernel_size={kernel_size} must be odd to keep the spatial size")
        check_bool("dms", "per_channel", per_channel)
        self.num_channels = num_channels
        self.out = num_channels if per_channel else 1
        pad = kernel_size // 2
        self.net = nn.Sequential(
            nn.Conv2d(2, hidden_channels, kernel_size, padding=pad),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, 2 * self.out, kernel_size, padding=pad),
        )
        nn.init.zeros_(self.net[2].weight)
        with torch.no_grad():
            self.net[2].bias.zero_()
            self.net[2].bias[self.out:].fill_(1.0)  # gamma starts at 1
        self.__dict__["_source"] = (pono,)

    def forward(self, x: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        mean, std = _moments("dms", self.__dict__["_source"], mean, std)
        beta, gamma = self.net(torch.cat([mean, std], dim=1)).split(self.out, dim=1)
        return torch.addcmul(beta, x, gamma)
