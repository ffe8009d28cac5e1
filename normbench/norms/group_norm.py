"""Group Norm (Wu & He 2018) and its two ends: the GN paper's LayerNorm (G=1) and InstanceNorm (G=C).

All three are thin subclasses of ``nn.GroupNorm`` calling ``F.group_norm`` directly (biased variance over
(C/G, H, W) per sample, contiguous channel blocks, eps 1e-5, same in train and eval). The only addition:
if a backend returns NCHW for a channels_last input (historically CUDA GroupNorm), the output is put back
into channels_last so the layer never changes the memory format. A group holding a single value (1x1 map
with one channel per group, e.g. ``in`` on a 1x1 map) raises NormConfigError instead of returning the bias.

``ln`` here is NOT timm's ``LayerNorm2d`` (which normalizes over C at each pixel, i.e. PONO-like).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import NormConfigError, NormLayer, check_channels, check_eps, check_input, check_int

__all__ = ["GroupNorm", "LayerNormGN", "InstanceNormGN", "resolve_groups"]


def resolve_groups(layer: str, num_channels: int, groups: int | None, channels_per_group: int | None) -> int:
    """Number of groups from exactly one of ``groups`` / ``channels_per_group`` (both None -> 32)."""
    if groups is not None and channels_per_group is not None:
        raise NormConfigError(
            f"{layer}: both groups={groups} and channels_per_group={channels_per_group} are set; set only one"
        )
    if channels_per_group is not None:
        if num_channels % channels_per_group != 0:
            raise NormConfigError(
                f"{layer}: channels_per_group={channels_per_group} does not divide num_channels={num_channels}; "
                f"choose channels_per_group dividing {num_channels} or set groups"
            )
        return num_channels // channels_per_group
    groups = 32 if groups is None else groups
    if num_channels % groups != 0:
        raise NormConfigError(
            f"{layer}: groups={groups} does not divide num_channels={num_channels}; "
            f"choose groups dividing {num_channels} or set channels_per_group"
        )
    return groups


def _keep_format(x: Tensor, y: Tensor) -> Tensor:
    if (
        not y.is_contiguous(memory_format=torch.channels_last)
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    ):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _check_groups(layer: str, groups, channels_per_group, eps) -> None:
    check_int(layer, "groups", groups, minimum=1, allow_none=True)
    check_int(layer, "channels_per_group", channels_per_group, minimum=1, allow_none=True)
    if groups is not None and channels_per_group is not None:
        raise NormConfigError(
            f"{layer}: both groups={groups} and channels_per_group={channels_per_group} are set; set only one"
        )
    check_eps(layer, eps)


class GroupNorm(NormLayer, nn.GroupNorm):
    """``gn``: GroupNorm with exactly one of ``groups`` / ``channels_per_group`` (both None -> groups=32)."""

    norm_name = "gn"

    @classmethod
    def _check(cls, groups, channels_per_group, eps):
        _check_groups(cls.norm_name, groups, channels_per_group, eps)

    def __init__(
        self,
        num_channels: int,
        groups: int | None = None,
        channels_per_group: int | None = None,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        _check_groups(self.norm_name, groups, channels_per_group, eps)  # ln / in name themselves
        num_channels = check_channels(self.norm_name, num_channels)
        g = resolve_groups(self.norm_name, num_channels, groups, channels_per_group)
        super().__init__(g, num_channels, eps=eps, affine=True, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        cpg = self.num_channels // self.num_groups
        if cpg * x.shape[2] * x.shape[3] == 1:
            raise NormConfigError(
                f"{self.norm_name}: a {x.shape[2]}x{x.shape[3]} map with {cpg} channel per group gives 1 value per "
                f"group (num_channels={self.num_channels}, groups={self.num_groups}), so the statistics are "
                f"undefined and the output would be the bias alone; use larger maps or fewer groups (gn/ln)"
            )
        return _keep_format(x, F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNormGN(GroupNorm):
    """``ln``: the GN paper's LayerNorm = GroupNorm with G=1 (statistics over C, H, W per sample)."""

    norm_name = "ln"

    @classmethod
    def _check(cls, eps):
        check_eps(cls.norm_name, eps)

    def __init__(self, num_channels: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(num_channels, groups=1, eps=eps, device=device, dtype=dtype)


class InstanceNormGN(GroupNorm):
    """``in``: InstanceNorm with per-channel affine = GroupNorm with G=C (statistics over H, W)."""

    norm_name = "in"

    @classmethod
    def _check(cls, eps):
        check_eps(cls.norm_name, eps)

    def __init__(self, num_channels: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__(num_channels, channels_per_group=1, eps=eps, device=device, dtype=dtype)
