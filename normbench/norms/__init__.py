"""normbench's normalization-layer library (one concept per file, timm-style).

Public API::

    build_norm(name, num_channels, **options) -> nn.Module
    norm_layer(name, **options) -> callable(num_channels, **extra)      # torchvision / timm ``norm_layer``
    norm_options(name) -> frozenset[str];  NORM_NAMES;  NormConfigError (ValueError, one-line messages)
    NormSpec.from_config(config): a run's norm choice (layer, label, batch-dependence, trainer hooks)
    is_norm_layer(module);  reads_running_stats_in_training(model);  batch_statistic_layers(model)
    switchable_importance(model);  reestimate_batch_average(model, batches)
    MomentShortcut, DynamicMomentShortcut (PONO), WSConv2d (Weight Standardization)

Names: bn (per-GPU BN), syncbn, gn, ln (=GN G=1), in (=GN G=C), sn, pono, brn, frn, evonorm_b0, evonorm_s0,
none. Exact semantics: each module's docstring and docs/papers.md section 3.
"""

from ._common import NormConfigError, NormLayer
from .batch_norm import PerGPUBatchNorm2d, SyncBatchNorm2d
from .batch_renorm import BatchRenorm2d
from .evonorm import EvoNorm2dB0, EvoNorm2dS0
from .factory import NORM_CLASSES, NORM_NAMES, build_norm, norm_layer, norm_options
from .filter_response_norm import FilterResponseNorm2d
from .group_norm import GroupNorm, InstanceNormGN, LayerNormGN
from .helpers import batch_statistic_layers, buffers_kept, is_norm_layer, reads_running_stats_in_training
from .identity import NoNorm
from .positional_norm import DynamicMomentShortcut, MomentShortcut, PositionalNorm
from .spec import NormSpec
from .switchable_norm import SwitchableNorm2d, reestimate_batch_average, switchable_importance
from .weight_std import WSConv2d, convert_to_ws, standardize_weight

__all__ = [
    "build_norm",
    "norm_layer",
    "norm_options",
    "NORM_NAMES",
    "NORM_CLASSES",
    "NormConfigError",
    "NormSpec",
    "NormLayer",
    "is_norm_layer",
    "reads_running_stats_in_training",
    "batch_statistic_layers",
    "buffers_kept",
    "switchable_importance",
    "reestimate_batch_average",
    "MomentShortcut",
    "DynamicMomentShortcut",
    "WSConv2d",
    "convert_to_ws",
    "standardize_weight",
    "PerGPUBatchNorm2d",
    "SyncBatchNorm2d",
    "GroupNorm",
    "LayerNormGN",
    "InstanceNormGN",
    "SwitchableNorm2d",
    "PositionalNorm",
    "BatchRenorm2d",
    "FilterResponseNorm2d",
    "EvoNorm2dB0",
    "EvoNorm2dS0",
    "NoNorm",
]
