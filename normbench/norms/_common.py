"""Shared pieces of the norm library: the error type, the marker base class and option checks.

Every bad-input error raised by this package is a :class:`NormConfigError` (a ``ValueError``) whose message
is ONE line naming the layer, the offending numbers and the fix.
"""

from __future__ import annotations

import inspect
import numbers

import torch
from torch import Tensor, nn

__all__ = [
    "NormConfigError",
    "NormLayer",
    "PerGPULayer",
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_channels",
    "check_input",
    "split_gpus",
    "gpu_view",
]


class NormConfigError(ValueError):
    """A normalization layer was asked for something it cannot do (one-line message: layer, numbers, fix)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # guarantee a single line


# __init__ parameters that are not options of the layer
_NOT_OPTIONS = frozenset({"self", "num_channels", "device", "dtype"})


class NormLayer:
    """Mixin of every layer built by :func:`normbench.norms.build_norm`.

    ``is_norm_layer`` recognizes it (weight-decay grouping); ``reads_running_stats_in_training`` is True for
    layers whose training forward reads running statistics (Batch Renorm), which then need their buffers
    synchronized across DDP ranks every step.

    A layer's options and their defaults are written once, in its ``__init__`` signature; ``option_names`` and
    ``check_options`` read them from there, and the layer's ``_check`` validates a full set of values.
    """

    norm_name: str = "norm"
    reads_running_stats_in_training: bool = False
    # True where the TRAINING forward normalizes with per-GPU batch statistics (bn_eval's PreciseBN and
    # batch_stats evaluations re-estimate or recompute them); SN answers per layer (its use_bn)
    normalizes_with_batch_statistics: bool = False

    # ---- what the trainer asks of the layer kind (through normbench.norms.NormSpec), never its name -------------
    @classmethod
    def for_processes(cls, model: nn.Module, distributed: bool) -> nn.Module:
        """The model as it trains across ``distributed`` processes (syncbn swaps in torch's SyncBatchNorm)."""
        return model

    @classmethod
    def before_evaluation(cls, model: nn.Module, train_batches, settings: dict) -> bool:
        """Work before each evaluation (SN's batch-average re-estimation); True if buffers changed, so the
        trainer averages them across ranks. ``train_batches()`` yields training inputs; ``settings`` is the
        config's norm node."""
        return False

    @classmethod
    def recorded(cls, model: nn.Module) -> dict:
        """Extra fields of the run's result.json (SN's importance weights)."""
        return {}

    @classmethod
    def epoch_scalars(cls, model: nn.Module) -> dict[str, float]:
        """Numbers to follow epoch by epoch (metrics.jsonl and the dashboards): SN's mean importance weights."""
        return {}

    @classmethod
    def _option_defaults(cls) -> dict:
        params = inspect.signature(cls.__init__).parameters
        return {
            k: p.default
            for k, p in params.items()
            if k not in _NOT_OPTIONS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The options ``__init__`` takes besides ``num_channels``, ``device`` and ``dtype``."""
        return frozenset(cls._option_defaults())

    @classmethod
    def check_options(cls, **options) -> None:
        """Raise :class:`NormConfigError` for an option the layer does not take or a value it cannot use
        (checks that need the channel count run when the layer is built)."""
        defaults = cls._option_defaults()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            accepts = ", ".join(sorted(defaults)) if defaults else "no options"
            raise NormConfigError(
                f"{cls.norm_name}: unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; {cls.norm_name} accepts {accepts}"
            )
        cls._check(**{**defaults, **options})

    @classmethod
    def _check(cls, **values) -> None:
        """Validate every option's value (all given); layers with options override it."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(layer: str, name: str, value, minimum: int | None = 1, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not _is_int(value):
        raise NormConfigError(f"{layer}: {name}={value!r} must be an integer" + (" or None" if allow_none else ""))
    if minimum is not None and value < minimum:
        raise NormConfigError(f"{layer}: {name}={value} must be >= {minimum}")
    return int(value)


def check_float(
    layer: str,
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    allow_none: bool = False,
):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NormConfigError(f"{layer}: {name}={value!r} must be a number")
    value = float(value)
    if value != value:
        raise NormConfigError(f"{layer}: {name}=nan is not allowed")
    if low is not None and (value <= low if low_open else value < low):
        raise NormConfigError(f"{layer}: {name}={value} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise NormConfigError(f"{layer}: {name}={value} must be <= {high}")
    return value


def check_bool(layer: str, name: str, value):
    if not isinstance(value, bool):
        raise NormConfigError(f"{layer}: {name}={value!r} must be true or false")
    return value


def check_choice(layer: str, name: str, value, choices):
    if value not in choices:
        raise NormConfigError(f"{layer}: {name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def check_eps(layer: str, value):
    return check_float(layer, "eps", value, low=0.0, low_open=True)


def check_momentum(layer: str, value):
    return check_float(layer, "momentum", value, low=0.0, high=1.0)


def check_batch_options(layer: str, per_gpu_batch, momentum, eps) -> None:
    """The options every layer with per-GPU batch statistics takes (bn, sn, brn, evonorm_b0)."""
    check_int(layer, "per_gpu_batch", per_gpu_batch, minimum=1, allow_none=True)
    check_momentum(layer, momentum)
    check_eps(layer, eps)


def check_channels(layer: str, num_channels, minimum: int = 1) -> int:
    if not _is_int(num_channels):
        raise NormConfigError(f"{layer}: num_channels={num_channels!r} must be an integer")
    if num_channels < minimum:
        raise NormConfigError(f"{layer}: num_channels={num_channels} must be >= {minimum}")
    return int(num_channels)


def check_input(layer: str, x: Tensor, num_channels: int) -> None:
    if x.dim() != 4:
        raise NormConfigError(f"{layer}: expected a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != num_channels:
        raise NormConfigError(
            f"{layer}: input has {x.shape[1]} channels but the layer was built for num_channels={num_channels}"
        )


def split_gpus(
    layer: str, x: Tensor, per_gpu_batch: int | None, fix: str = "use more images per GPU"
) -> tuple[int, int, int]:
    """(k, n, m): a training batch of N = k x n images on k emulated GPUs of n images each, and the
    m = n*H*W values per channel each GPU's statistics see (an error when m < 2; ``fix`` ends it).

    Emulated GPU ``j`` holds images ``j, j + k, j + 2k, ...`` (image ``i`` is on GPU ``i mod k``): the batch is
    image-major, so ``x.view(n, k * C, H, W)`` puts each (GPU, channel) pair in a channel of its own without a
    copy, and one native BatchNorm call computes every GPU's statistics (see :func:`gpu_view`). The data layer
    hands out global-batch positions the same way (rank ``r`` of ``w`` takes positions ``r, r + w, ...``), so a
    position's GPU is ``position mod gpus`` whatever the number of processes. Batches are shuffled, so which
    images share a GPU is as random as with consecutive slices."""
    n_total = x.shape[0]
    n = n_total if per_gpu_batch is None else per_gpu_batch
    if n_total % n != 0:
        raise NormConfigError(
            f"{layer}: batch of N={n_total} is not a multiple of per_gpu_batch={per_gpu_batch}; "
            f"use a batch of k x {per_gpu_batch} images (e.g. drop_last=True) or change per_gpu_batch"
        )
    m = n * x.shape[2] * x.shape[3]
    if m < 2:
        raise NormConfigError(
            f"{layer}: a per-GPU chunk of n={n} image(s) with a {x.shape[2]}x{x.shape[3]} map gives {m} value "
            f"per channel, so the batch variance is undefined; {fix}"
        )
    return n_total // n, n, m


def gpu_view(x: Tensor, k: int, n: int) -> Tensor:
    """(N, C, H, W) -> (n, k, C, H, W) view: ``[a, j]`` is image ``a * k + j``, on emulated GPU ``j`` (see
    :func:`split_gpus`). Statistics per GPU reduce over dims (0, 3, 4)."""
    N, C, H, W = x.shape
    return x.view(n, k, C, H, W)


def stats_dtype(x: Tensor) -> torch.dtype:
    """float32 statistics for half-precision input; float32 / float64 input keeps its own."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def add_affine(module: nn.Module, num_channels: int, device=None, dtype=None) -> None:
    """Per-channel gamma = 1 and beta = 0 as `weight` and `bias` (what zero-init and weight decay look for)."""
    module.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
    module.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))


def add_running_stats(module: nn.Module, num_channels: int, device=None, dtype=None, mean: bool = True) -> None:
    """BatchNorm2d-compatible buffers (same state-dict keys): running_mean, running_var, num_batches_tracked."""
    if mean:
        module.register_buffer("running_mean", torch.zeros(num_channels, device=device, dtype=dtype))
    module.register_buffer("running_var", torch.ones(num_channels, device=device, dtype=dtype))
    module.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))


class PerGPULayer(NormLayer):
    """Base of the layers with per-GPU batch statistics and BatchNorm2d-style state (bn, brn, sn, evonorm_b0):
    the shared options (per_gpu_batch, momentum, eps), their checks, the state and its repr."""

    normalizes_with_batch_statistics = True

    @classmethod
    def _check(cls, per_gpu_batch, momentum, eps, **extra):
        check_batch_options(cls.norm_name, per_gpu_batch, momentum, eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, per_gpu_batch={self.per_gpu_batch}, momentum={self.momentum}, eps={self.eps}"


def init_batch_layer(
    module: nn.Module,
    num_channels: int,
    per_gpu_batch,
    momentum,
    eps,
    device=None,
    dtype=None,
    running_mean: bool = True,
) -> dict:
    """The state every layer with per-GPU batch statistics has (bn, brn, sn, evonorm_b0): channel count,
    per_gpu_batch / momentum / eps, per-channel affine and BatchNorm2d-compatible running statistics.
    Returns the factory kwargs for the layer's own extra parameters."""
    module.num_channels = module.num_features = check_channels(module.norm_name, num_channels)
    module.per_gpu_batch = per_gpu_batch
    module.momentum = float(momentum)
    module.eps = float(eps)
    fk = {"device": device, "dtype": dtype}
    add_affine(module, num_channels, **fk)
    add_running_stats(module, num_channels, **fk, mean=running_mean)
    return fk
