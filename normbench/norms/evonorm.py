"""EvoNorm-B0 and EvoNorm-S0 (Liu et al. 2020), following timm's reference implementations.

B0:  y = x / max(sqrt(var_batch + eps), v * x + sqrt(var_instance + eps)) * weight + bias
     var_batch: biased, over (n, H, W) per channel and per emulated GPU (``per_gpu_batch``); the running
     average (unbiased, average over GPUs of each GPU's update, PyTorch momentum) replaces it at eval.
     var_instance: biased, over (H, W) per sample and channel. v init 1.
S0:  y = x * sigmoid(v * x) / sqrt(var_group + eps) * weight + bias, var_group biased over (C/G, H, W)
     per sample, ``groups``=32 (must divide C). v init 1. Same in train and eval.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (
    NormLayer,
    PerGPULayer,
    add_affine,
    check_channels,
    check_eps,
    check_input,
    check_int,
    gpu_view,
    init_batch_layer,
    split_gpus,
)
from .group_norm import resolve_groups

__all__ = ["EvoNorm2dB0", "EvoNorm2dS0"]


class EvoNorm2dB0(PerGPULayer, nn.Module):
    """``evonorm_b0``."""

    norm_name = "evonorm_b0"

    def __init__(
        self,
        num_channels: int,
        per_gpu_batch: int | None = None,
        momentum: float = 0.1,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._check(per_gpu_batch, momentum, eps)
        fk = init_batch_layer(self, num_channels, per_gpu_batch, momentum, eps, device, dtype, running_mean=False)
        self.v = nn.Parameter(torch.ones(num_channels, **fk))

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        N, C, H, W = x.shape
        shape = (1, C, 1, 1)
        if self.training:
            k, n, m = split_gpus(self.norm_name, x, self.per_gpu_batch)
            x5 = gpu_view(x, k, n)
            mean = x5.mean((0, 3, 4), keepdim=True)
            var_b = (x5 - mean).square().mean((0, 3, 4), keepdim=True)  # (1, k, C, 1, 1) biased
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_var.lerp_(
                    (var_b.view(k, C).mean(0) * (m / (m - 1))).to(self.running_var.dtype), self.momentum
                )
            left = torch.sqrt(var_b + self.eps).expand(n, k, C, 1, 1).reshape(N, C, 1, 1)
        else:
            left = torch.sqrt(self.running_var + self.eps).view(shape)
        # two-pass variance (CPU torch.var is a slow Welford pass) and max(l, r) = l + relu(r - l) (torch.maximum's
        # backward splits ties and reduces broadcast operands through ~10 full-size passes)
        mean_i = x.mean(dim=(2, 3), keepdim=True)
        var_i = (x - mean_i).square().mean(dim=(2, 3), keepdim=True)
        right = torch.addcmul(torch.sqrt(var_i + self.eps) - left, x, self.v.view(shape))  # r - l
        y = x / (torch.relu_(right) + left)
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))


class EvoNorm2dS0(NormLayer, nn.Module):
    """``evonorm_s0``."""

    norm_name = "evonorm_s0"

    @classmethod
    def _check(cls, groups, eps):
        check_int(cls.norm_name, "groups", groups, minimum=1)
        check_eps(cls.norm_name, eps)

    def __init__(self, num_channels: int, groups: int = 32, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self._check(groups, eps)
        self.num_channels = self.num_features = check_channels(self.norm_name, num_channels)
        self.groups = resolve_groups(self.norm_name, self.num_channels, groups, None)
        self.eps = float(eps)
        fk = {"device": device, "dtype": dtype}
        add_affine(self, num_channels, **fk)
        self.v = nn.Parameter(torch.ones(num_channels, **fk))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        N, C, H, W = x.shape
        shape = (1, C, 1, 1)
        xg = x.view(N, self.groups, C // self.groups, H, W)
        var_g = xg.var(dim=(2, 3, 4), correction=0, keepdim=True)
        inv = torch.rsqrt(var_g + self.eps).expand(N, self.groups, C // self.groups, 1, 1).reshape(N, C, 1, 1)
        y = x * torch.sigmoid(x * self.v.view(shape)) * inv
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
