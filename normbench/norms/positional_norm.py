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
from torch.autograd.function import once_differentiable

from ._common import (
    NormConfigError,
    NormLayer,
    add_affine,
    check_bool,
    check_channels,
    check_eps,
    check_input,
    check_int,
)

__all__ = ["PositionalNorm", "MomentShortcut", "DynamicMomentShortcut"]


def _channel_dot(t: Tensor, w: Tensor | None) -> Tensor:
    """sum_c w_c t[:, c] (w None: plain sum) as (N, 1, H, W); a batched gemv when t is NCHW-contiguous (``bmm``
    with the weights as a stride-0 batch: ``torch.matmul(w, t)`` copied t into a transposed layout first)."""
    N, C, H, W = t.shape
    if w is None:
        return t.sum(1, keepdim=True)
    if t.is_contiguous():
        return torch.bmm(w.to(t.dtype).view(1, 1, C).expand(N, 1, C), t.view(N, C, H * W)).view(N, 1, H, W)
    return (t * w.view(1, C, 1, 1)).sum(1, keepdim=True)


def _channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum of an (N, C, H, W) tensor: the contiguous (H, W) rows first (one reduction over (0, 2, 3)
    ran 2-3x slower on the CPU here)."""
    return t.sum((2, 3)).sum(0)


class _Pono(torch.autograd.Function):
    """PONO with its moments as differentiable outputs (the Moment Shortcut back-propagates through them).

    Forward: the mean, ``d = x - mean``, the unbiased variance over C from ``d * d`` written into the buffer that
    then holds y, and ``x_hat = d / std`` in place: two large allocations (autograd's version made five).
    Backward, with unbiased std: ``grad_x = g_xhat / std + x_hat * P + Q`` per (n, h, w), where
    ``P = (g_std - S2 / std) / (C - 1)``, ``Q = (g_mean - S1 / std) / C``, ``S1 = sum_c g_xhat``,
    ``S2 = sum_c g_xhat x_hat`` (the channel sums weighted by gamma are one batched gemv each)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        C = x.shape[1]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        mean = xf.mean(1, keepdim=True)
        xhat = xf - mean
        buf = torch.mul(xhat, xhat)
        std = buf.sum(1, keepdim=True).div_(C - 1).add_(eps).sqrt_()
        xhat.div_(std)
        if weight is None:
            y = buf.copy_(xhat)
        else:
            y = torch.mul(xhat, weight.view(1, C, 1, 1), out=buf).add_(bias.view(1, C, 1, 1))
        ctx.save_for_backward(xhat, std, weight)
        ctx.x_dtype = dt = x.dtype
        return y.to(dt), mean.to(dt), std.to(dt)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y: Tensor | None, g_mean: Tensor | None, g_std: Tensor | None):
        xhat, std, weight = ctx.saved_tensors
        N, C, H, W = xhat.shape
        inv = std.reciprocal()
        g_w = g_b = None
        g = torch.zeros_like(xhat) if g_y is None else g_y.to(xhat.dtype)
        t = g * xhat
        s2 = _channel_dot(t, weight)
        s1 = _channel_dot(g, weight)
        if weight is not None:
            g_w, g_b = _channel_sum(t), _channel_sum(g)
            grad_x = torch.mul(g, weight.view(1, C, 1, 1), out=t).mul_(inv)  # g_xhat / std, in t's buffer
        else:
            grad_x = torch.mul(g, inv, out=t)
        p_coef = -s2 * inv
        q_coef = -s1 * inv
        if g_std is not None:
            p_coef += g_std.to(xhat.dtype)
        if g_mean is not None:
            q_coef += g_mean.to(xhat.dtype)
        grad_x.addcmul_(xhat, p_coef.div_(C - 1)).add_(q_coef.div_(C))  # in place: no second large allocation
        return grad_x.to(ctx.x_dtype), g_w, g_b, None


def _pono_plain(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """The same PONO as :class:`_Pono` in differentiable tensor ops, for torch.compile (one graph; inductor
    derives and fuses the backward): statistics in float32 at least, outputs in x's dtype."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    var, mean = torch.var_mean(xf, dim=1, correction=1, keepdim=True)
    std = torch.sqrt(var + eps)
    y = (xf - mean) / std
    if weight is not None:
        C = x.shape[1]
        y = y * weight.view(1, C, 1, 1) + bias.view(1, C, 1, 1)
    return y.to(x.dtype), mean.to(x.dtype), std.to(x.dtype)


class PositionalNorm(NormLayer, nn.Module):
    """``pono``: Positional Norm over C at each (n, h, w); per-channel affine when ``affine=True``."""

    norm_name = "pono"

    @classmethod
    def _check(cls, affine, eps, return_moments):
        check_bool(cls.norm_name, "affine", affine)
        check_eps(cls.norm_name, eps)
        check_bool(cls.norm_name, "return_moments", return_moments)

    def __init__(
        self,
        num_channels: int,
        affine: bool = True,
        eps: float = 1e-5,
        return_moments: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._check(affine, eps, return_moments)
        num_channels = check_channels(self.norm_name, num_channels)
        if num_channels < 2:
            raise NormConfigError(
                f"pono: num_channels={num_channels} leaves the unbiased variance over channels undefined; "
                f"PONO needs num_channels >= 2"
            )
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
        if torch.compiler.is_compiling():
            y, mean, std = _pono_plain(x, self.weight, self.bias, self.eps)
        else:
            y, mean, std = _Pono.apply(x, self.weight, self.bias, self.eps)
        self.last_mean, self.last_std = mean, std
        if self.return_moments:
            return y, mean, std
        return y


def _moments(layer: str, source, mean: Tensor | None, std: Tensor | None) -> tuple[Tensor, Tensor]:
    """The explicit (mean, std), or the latest ones of the PONO layer a shortcut was built with."""
    if mean is None or std is None:
        pono = source[0]
        if pono is None or pono.last_mean is None:
            raise NormConfigError(
                f"{layer}: no moments; pass mean and std, or build the shortcut with its PONO "
                "layer and run that layer's forward first"
            )
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

    def __init__(
        self,
        num_channels: int,
        hidden_channels: int = 32,
        kernel_size: int = 3,
        per_channel: bool = True,
        pono: PositionalNorm | None = None,
    ):
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
            self.net[2].bias[self.out :].fill_(1.0)  # gamma starts at 1
        self.__dict__["_source"] = (pono,)

    def forward(self, x: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        mean, std = _moments("dms", self.__dict__["_source"], mean, std)
        beta, gamma = self.net(torch.cat([mean, std], dim=1)).split(self.out, dim=1)
        return torch.addcmul(beta, x, gamma)
