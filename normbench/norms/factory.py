"""Build normalization layers by name: ``build_norm``, ``norm_layer``, ``norm_options``, ``NORM_NAMES``.

Unknown names and options, wrong types and out-of-range values raise :class:`NormConfigError` (one line:
layer, numbers, fix). Checks that need the channel count (groups dividing C, ...) run when the layer is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from ._common import NormConfigError, check_bool
from .batch_norm import PerGPUBatchNorm2d, SyncBatchNorm2d
from .batch_renorm import BatchRenorm2d
from .evonorm import EvoNorm2dB0, EvoNorm2dS0
from .filter_response_norm import FilterResponseNorm2d
from .group_norm import GroupNorm, InstanceNormGN, LayerNormGN
from .identity import NoNorm
from .positional_norm import PositionalNorm
from .switchable_norm import SwitchableNorm2d

__all__ = ["build_norm", "norm_layer", "norm_options", "NORM_NAMES", "NORM_CLASSES", "make_norm"]

NORM_CLASSES: dict[str, type] = {
    "bn": PerGPUBatchNorm2d,
    "syncbn": SyncBatchNorm2d,
    "gn": GroupNorm,
    "ln": LayerNormGN,
    "in": InstanceNormGN,
    "sn": SwitchableNorm2d,
    "pono": PositionalNorm,
    "brn": BatchRenorm2d,
    "frn": FilterResponseNorm2d,
    "evonorm_b0": EvoNorm2dB0,
    "evonorm_s0": EvoNorm2dS0,
    "none": NoNorm,
}
NORM_NAMES: tuple[str, ...] = tuple(NORM_CLASSES)

# extra keyword arguments the callable returned by norm_layer() tolerates (timm / torchvision pass these)
_CALL_EXTRAS = frozenset({"eps", "affine", "device", "dtype"})


def _cls(name) -> type:
    if not isinstance(name, str) or name not in NORM_CLASSES:
        raise NormConfigError(f"unknown norm {name!r}; choose one of {', '.join(NORM_NAMES)}")
    return NORM_CLASSES[name]


def norm_options(name: str) -> frozenset[str]:
    """Option names the layer ``name`` accepts (e.g. the trainer passes ``per_gpu_batch`` only where accepted)."""
    return _cls(name).option_names()


def build_norm(name: str, num_channels: int, **options) -> nn.Module:
    """The layer ``name`` for ``num_channels`` channels with ``options`` (see ``norm_options(name)``)."""
    cls = _cls(name)
    cls.check_options(**options)
    return cls(num_channels, **options)


def make_norm(num_channels: int | None = None, /, *, norm_name: str, **kwargs) -> nn.Module:
    """What the ``norm_layer`` callable calls: ``kwargs`` = the layer's options plus what timm/torchvision pass
    to norm layers: ``num_features``/``num_channels`` (channel count by keyword), ``eps`` (ignored by ``none``),
    ``affine`` (True accepted; False only where the layer has an ``affine`` option, i.e. ``pono``), ``device``,
    ``dtype``. Anything else raises NormConfigError."""
    name = norm_name
    allowed = norm_options(name)
    for alias in ("num_features", "num_channels"):
        if alias in kwargs:
            if num_channels is not None:
                raise NormConfigError(f"{name}: channel count given twice ({num_channels} and {alias}={kwargs[alias]})")
            num_channels = kwargs.pop(alias)
    if num_channels is None and name != "none":
        raise NormConfigError(f"{name}: norm_layer called without a channel count")
    unknown = sorted(set(kwargs) - allowed - _CALL_EXTRAS)
    if unknown:
        raise NormConfigError(
            f"{name}: unexpected argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} for num_channels={num_channels}; accepted: "
            f"{', '.join(sorted(allowed | _CALL_EXTRAS))}"
        )
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    if "affine" in kwargs and "affine" not in allowed:
        if not check_bool(name, "affine", kwargs.pop("affine")):
            raise NormConfigError(
                f"{name}: affine=False is not supported (every normbench layer carries "
                f"per-channel weight and bias); drop affine or use affine=True"
            )
    if "eps" in kwargs and "eps" not in allowed:
        kwargs.pop("eps")  # 'none' has nothing to stabilize
    layer = build_norm(name, num_channels, **kwargs)
    if device is not None or dtype is not None:
        layer = layer.to(device=device, dtype=dtype)
    return layer


def norm_layer(name: str, **options) -> Callable[..., nn.Module]:
    """Validate ``options`` now; return ``functools.partial(make_norm, norm_name=name, **options)``, a callable
    ``(num_channels, **extra) -> nn.Module`` usable as torchvision's / timm's ``norm_layer`` (timm's
    ``get_norm_layer`` takes partials and re-binds their keywords)."""
    _cls(name).check_options(**options)
    return functools.partial(make_norm, norm_name=name, **options)
