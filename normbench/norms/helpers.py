"""Model-level helpers: ``is_norm_layer`` (weight-decay grouping) and ``reads_running_stats_in_training``."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ._common import NormLayer

__all__ = ["is_norm_layer", "reads_running_stats_in_training", "BUILTIN_NORM_TYPES"]

BUILTIN_NORM_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        _NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d, Lazy variants
        nn.GroupNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
        nn.CrossMapLRN2d,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for every layer built by ``build_norm`` and for torch's built-in norms (BatchNorm*, SyncBatchNorm,
    GroupNorm, LayerNorm, InstanceNorm*, LocalResponseNorm, CrossMapLRN2d, RMSNorm). torchvision's weight-decay
    grouping only knows the built-ins (docs/papers.md section 4); use this instead."""
    return isinstance(module, (NormLayer,) + BUILTIN_NORM_TYPES)


def reads_running_stats_in_training(model: nn.Module) -> bool:
    """True if any layer's TRAINING forward reads running statistics (Batch Renorm's r, d): the trainer must
    then keep buffers identical across DDP ranks every step (e.g. all-reduce-average them after each step)."""
    return any(getattr(m, "reads_running_stats_in_training", False) for m in model.modules())
