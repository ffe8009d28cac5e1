"""Model-level helpers: ``is_norm_layer`` (weight-decay grouping), ``reads_running_stats_in_training``,
``batch_statistic_layers`` and ``buffers_kept`` (the one snapshot of a model's state that re-estimation and
the BN evaluations put back)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ._common import NormLayer

__all__ = [
    "is_norm_layer",
    "reads_running_stats_in_training",
    "batch_statistic_layers",
    "buffers_kept",
    "BUILTIN_NORM_TYPES",
]

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


def batch_statistic_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose training forward normalizes with per-GPU batch statistics (bn, brn, evonorm_b0, and SN
    with its BN part)."""
    return [m for m in model.modules() if getattr(m, "normalizes_with_batch_statistics", False)]


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[callable]:
    """Every buffer, every module's train/eval flag and SN's stale-statistics flag are as before on exit; yields
    ``restore()``, which puts the buffers back on the spot (e.g. after each re-estimation batch)."""
    flags = {m: m.training for m in model.modules()}
    stale = {m: m._stale_batch_average for m in model.modules() if hasattr(m, "_stale_batch_average")}
    saved = [(b, b.clone()) for b in model.buffers()]

    def restore() -> None:
        for buffer, value in saved:
            buffer.copy_(value)

    try:
        yield restore
    finally:
        restore()
        for module, flag in flags.items():
            module.training = flag
        for module, flag in stale.items():
            module._stale_batch_average = flag
