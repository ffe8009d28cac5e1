"""Re-estimation of the statistics of batch-dependent layers from training batches: the one mechanism behind
SN's ``inference="batch_average"`` and PreciseBN (``normbench.bn_eval``).

The model runs in train mode under no_grad on each batch, so every layer normalizes with its per-GPU batch
statistics and the layers after it see the features they saw in training. A forward pre-hook on each target
layer records the per-GPU statistics of the layer's input -- mean and biased variance over (n, H, W) per channel
of each emulated GPU of ``per_gpu_batch`` images, image ``i`` on GPU ``i mod k`` (``_common.split_gpus``), the
statistics bn, brn, evonorm_b0 and SN's BN part normalize with in training -- into float64 sums. Every buffer of
the model is put back after each batch, so each batch sees the final model exactly (Batch Renorm's r and d use
the same running statistics for every batch; no step counter moves) and the result does not depend on the order.

Two ways to turn the sums into running statistics (``variance=``):

* ``"population"`` (PreciseBN): the mean and variance of all values the layer saw,
  ``mean = sum_b m_b mu_b / M``, ``var = sum_b m_b (sigma2_b + mu_b^2) / M - mean^2`` (``m_b`` values per GPU
  batch ``b``, ``M = sum_b m_b``; all ``m_b`` are equal in practice, so ``mean`` is the mean of the per-batch
  means). The variance therefore CONTAINS the spread of the batch means: it is the law of total variance,
  mean of the within-batch variances plus variance of the batch means. Why: in training every batch's output is
  normalized to mean 0 and variance 1, so over the data set the normalized features have variance exactly 1; only
  the population variance gives test-time features that variance. The mean of the batch variances alone (the
  EMA's target) leaves out the spread of the batch means, which is largest exactly where BN fails: few images per
  GPU (two images share one mean). The variance is the biased one over the M values; M >= 8192 x H x W makes
  the M / (M - 1) of an unbiased estimate irrelevant.
* ``"batch_average"`` (SN's batch average, as the SN paper and its code define it): the plain average over all
  GPU batches of each batch's (mean, unbiased variance ``sigma2_b m_b / (m_b - 1)``).

Under DDP pass ``reduce`` (an all-reduce SUM across ranks): the float64 sums are added across ranks before the
division, so two processes give what one process emulating all GPUs gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ._common import NormConfigError, gpu_view, split_gpus, stats_dtype
from .helpers import buffers_kept

__all__ = ["reestimate_statistics", "VARIANCE_MODES"]

VARIANCE_MODES = ("population", "batch_average")

# rows of a layer's (7, C) float64 accumulator
_GPUS, _SUM_MEAN, _SUM_VAR_UNBIASED, _SUM_M, _SUM_M_MEAN, _SUM_M_MEAN_SQ, _SUM_M_VAR = range(7)


def _first_device(model: nn.Module):
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return None


def _recorder(acc: dict, key: int):
    def hook(layer: nn.Module, args) -> None:
        x = args[0]
        k, n, m = split_gpus(layer.norm_name, x, layer.per_gpu_batch)
        dt = stats_dtype(x)
        var, mean = torch.var_mean(gpu_view(x, k, n).to(dt), dim=(0, 3, 4), correction=0)  # (k, C) biased
        mean, var = mean.double(), var.double()
        rows = torch.stack(
            [
                torch.full_like(mean[0], k),
                mean.sum(0),
                var.sum(0) * (m / (m - 1)),
                torch.full_like(mean[0], k * m),
                m * mean.sum(0),
                m * mean.square().sum(0),
                m * var.sum(0),
            ]
        )
        acc[key] = rows if acc.get(key) is None else acc[key] + rows

    return hook


def _finalize(rows: Tensor, variance: str) -> tuple[Tensor, Tensor]:
    if variance == "batch_average":
        return rows[_SUM_MEAN] / rows[_GPUS], rows[_SUM_VAR_UNBIASED] / rows[_GPUS]
    total = rows[_SUM_M]
    mean = rows[_SUM_M_MEAN] / total
    var = (rows[_SUM_M_VAR] + rows[_SUM_M_MEAN_SQ]) / total - mean.square()
    return mean, var.clamp_min(0.0)


@torch.no_grad()
def reestimate_statistics(
    model: nn.Module,
    layers: Sequence[nn.Module],
    batches: Iterable,
    *,
    variance: str = "population",
    forward: Callable[[nn.Module, Tensor], object] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> int:
    """Set ``running_mean`` (where the layer has one) and ``running_var`` of each of ``layers`` (modules of
    ``model`` with ``per_gpu_batch`` and ``norm_name``) from ``batches`` (tensors, or tuples/lists whose first
    element is the input), as ``variance`` says (see the module docstring). ``forward(model, x)`` runs one batch
    (default ``model(x)``; e.g. autocast or channels_last); ``reduce`` sums a tensor across DDP ranks.
    Every other buffer, every module's train/eval flag and SN's stale-statistics flag are as before when it
    returns. Returns the number of batches this process ran."""
    if variance not in VARIANCE_MODES:
        raise NormConfigError(f"reestimate: variance={variance!r} is not one of {', '.join(VARIANCE_MODES)}")
    layers = list(layers)
    if not layers:
        return 0
    if not {id(layer) for layer in layers} <= {id(m) for m in model.modules()}:
        raise NormConfigError("reestimate: every layer to re-estimate must be a module of the model")
    acc: dict[int, Tensor | None] = {i: None for i in range(len(layers))}
    device = _first_device(model)
    seen = 0
    with buffers_kept(model) as restore_buffers:
        hooks = [layer.register_forward_pre_hook(_recorder(acc, i)) for i, layer in enumerate(layers)]
        try:
            model.train()
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if device is not None and x.device != device:
                    x = x.to(device, non_blocking=True)
                forward(model, x) if forward is not None else model(x)
                restore_buffers()  # the next batch sees the final model again
                seen += 1
        finally:
            for hook in hooks:
                hook.remove()
    if seen == 0:
        raise NormConfigError("reestimate: got 0 batches; pass at least one training batch")
    for i, layer in enumerate(layers):
        if acc[i] is None:
            raise NormConfigError(
                f"reestimate: a {layer.norm_name} layer saw no input; is it used in the model's forward?"
            )
        rows = reduce(acc[i]) if reduce is not None else acc[i]
        mean, var = _finalize(rows, variance)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
    return seen
