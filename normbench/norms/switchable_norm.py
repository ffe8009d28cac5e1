"""Switchable Normalization (Luo et al., ICLR 2019).

    mean = w_in m_in + w_ln m_ln + w_bn m_bn,   w = softmax(mean_weight)
    var  = v_in v_in + v_ln v_ln + v_bn v_bn,   v = softmax(var_weight)       (own control logits)
    y    = (x - mean) / sqrt(var + eps) * weight + bias

Six control logits (``mean_weight[3]``, ``var_weight[3]``, order in/ln/bn), all initialized to 1.

Statistics are computed ONCE per (sample, channel) -- one reduction over (H, W) -- and LN's and BN's are
derived from IN's (docs/papers.md section 3):
    m_ln = mean_c m_in,   v_ln = mean_c (v_in + m_in^2) - m_ln^2
    m_bn = mean_n m_in,   v_bn = mean_n (v_in + m_in^2) - m_bn^2     (per emulated GPU of per_gpu_batch images)
followed by a single fused normalize ``y = x * A + B`` with a custom backward (see ``_fused.py``).
The variances are evaluated in the equal, cancellation-free form ``mean(v_in) + mean((m_in - m)^2)``: with
``mean_c(v_in + m_in^2) - m_ln^2`` a float32 input whose mean is 1000x its std loses the variance entirely.

Variance decision: **biased** IN variance (divide by H*W), like BN/GN/IN in both papers' tables, whereas the
official SN code uses the unbiased one. Consequences: LN/BN statistics derived from it are exactly the
biased LN/BN statistics; a 1x1 feature map is well defined (v_in = 0, the result is finite; no NaN ever).
The pooled form of the derived variances is non-negative by construction (no clamp needed).

BN part (``use_bn=True``): training uses per-GPU batch statistics (``per_gpu_batch`` images per emulated
GPU, image i on GPU i mod k as in ``PerGPUBatchNorm2d``; None = whole batch). Running statistics follow
``PerGPUBatchNorm2d``: the average over GPUs of each GPU's usual update, variance stored unbiased
(x M/(M-1), M = n*H*W), PyTorch momentum convention.
Eval uses
  * ``inference="moving_average"``: those running statistics;
  * ``inference="batch_average"``: running statistics re-estimated by :func:`reestimate_batch_average`,
    the plain average over all emulated GPUs of a few training batches of each GPU's (mean, unbiased var).
``use_bn=False`` mixes IN and LN only (the BN logits are kept for a uniform state dict but unused); it is
required with ``per_gpu_batch=1`` (BN over one image equals IN).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._common import (
    NormConfigError,
    PerGPULayer,
    check_bool,
    check_choice,
    check_input,
    init_batch_layer,
    split_gpus,
)
from ._fused import compiling, stats_affine, var_mean

__all__ = ["SwitchableNorm2d", "switchable_importance", "reestimate_batch_average"]

INFERENCE_MODES = ("moving_average", "batch_average")


def _pooled(m: Tensor, v: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the union of equal-sized groups with means m and biased variances v,
    pooled over ``dim`` (keepdim): mean(v) + mean((m - mean(m))^2) == mean(v + m^2) - mean(m)^2, without the
    cancellation."""
    mp = m.mean(dim, keepdim=True)
    return mp, v.mean(dim, keepdim=True) + (m - mp).square().mean(dim, keepdim=True)


def _sn_coeffs(
    m_in: Tensor,
    v_in: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
    weight: Tensor,
    bias: Tensor,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    k: int,
    eps: float,
):
    """(A, B) of y = x*A + B from IN statistics (N, C, 1, 1); bn_mean/var given = eval (running) stats."""
    N, C = m_in.shape[:2]
    m_ln, v_ln = _pooled(m_in, v_in, 1)
    if bn_mean is None and k > 0:  # training: per-GPU batch statistics (image i on GPU i mod k)
        n = N // k
        m_bn, v_bn = _pooled(m_in.view(n, k, C), v_in.view(n, k, C), 0)
        m_bn = m_bn.expand(n, k, C).reshape(N, C, 1, 1)
        v_bn = v_bn.expand(n, k, C).reshape(N, C, 1, 1)
    elif bn_mean is not None:
        m_bn = bn_mean.view(1, C, 1, 1).to(m_in.dtype)
        v_bn = bn_var.view(1, C, 1, 1).to(m_in.dtype)
    else:
        m_bn = v_bn = None
    if m_bn is None:
        wm = torch.softmax(mean_logits[:2], 0)
        wv = torch.softmax(var_logits[:2], 0)
        mean = wm[0] * m_in + wm[1] * m_ln
        var = wv[0] * v_in + wv[1] * v_ln
    else:
        wm = torch.softmax(mean_logits, 0)
        wv = torch.softmax(var_logits, 0)
        mean = wm[0] * m_in + wm[1] * m_ln + wm[2] * m_bn
        var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
    a = weight.view(1, C, 1, 1) * torch.rsqrt(var + eps)
    return a, bias.view(1, C, 1, 1) - mean * a


class SwitchableNorm2d(PerGPULayer, nn.Module):
    """``sn``: Switchable Norm (see the module docstring for the exact semantics and decisions)."""

    norm_name = "sn"

    @classmethod
    def _check(cls, per_gpu_batch, use_bn, inference, momentum, eps):
        super()._check(per_gpu_batch, momentum, eps)
        check_bool(cls.norm_name, "use_bn", use_bn)
        check_choice(cls.norm_name, "inference", inference, INFERENCE_MODES)
        if use_bn and per_gpu_batch == 1:
            raise NormConfigError(
                f"{cls.norm_name}: use_bn=true with per_gpu_batch=1 makes the BN statistics equal IN's (one image per "
                f"GPU); set use_bn=false (the SN paper mixes IN and LN only at 1 image/GPU)"
            )

    def __init__(
        self,
        num_channels: int,
        per_gpu_batch: int | None = None,
        use_bn: bool = True,
        inference: str = "moving_average",
        momentum: float = 0.1,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._check(per_gpu_batch, use_bn, inference, momentum, eps)
        fk = init_batch_layer(self, num_channels, per_gpu_batch, momentum, eps, device, dtype)
        self.use_bn = use_bn
        self.inference = inference
        self.mean_weight = nn.Parameter(torch.ones(3, **fk))  # the 6 control logits, equal thirds at init
        self.var_weight = nn.Parameter(torch.ones(3, **fk))
        self._stale_batch_average = False  # trained since the last reestimate_batch_average

    @property
    def normalizes_with_batch_statistics(self) -> bool:
        return self.use_bn

    @classmethod
    def before_evaluation(cls, model: nn.Module, train_batches, settings: dict) -> bool:
        """inference=batch_average: the BN part's statistics re-estimated from ``settings["reestimate_batches"]``
        training batches before every evaluation (the SN paper's "batch average")."""
        if settings.get("inference") != "batch_average":
            return False
        batches = (x for _, x in zip(range(settings["reestimate_batches"]), train_batches()))
        reestimate_batch_average(model, batches)
        return True

    @classmethod
    def recorded(cls, model: nn.Module) -> dict:
        return {"sn_importance": switchable_importance(model)}

    @classmethod
    def epoch_scalars(cls, model: nn.Module) -> dict[str, float]:
        """The importance weights averaged over the network's SN layers: ``sn_mean_in``, ``sn_mean_ln``,
        ``sn_mean_bn``, ``sn_var_in``, ... (the per-layer weights of the final model are in result.json)."""
        layers = list(switchable_importance(model).values())
        return {
            f"sn_{statistic}_{kind}": sum(layer[statistic][kind] for layer in layers) / len(layers)
            for statistic in ("mean", "var")
            for kind in ("in", "ln", "bn")
            if layers
        }

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, per_gpu_batch={self.per_gpu_batch}, use_bn={self.use_bn}, "
            f"inference={self.inference!r}, momentum={self.momentum}, eps={self.eps}"
        )

    def importance(self) -> dict[str, dict[str, float]]:
        out = {}
        for key, logits in (("mean", self.mean_weight), ("var", self.var_weight)):
            w = torch.softmax(logits.detach().float()[: 3 if self.use_bn else 2], 0).tolist()
            out[key] = {"in": w[0], "ln": w[1], "bn": w[2] if self.use_bn else 0.0}
        return out

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        N, C, H, W = x.shape
        v_in, m_in, scratch = var_mean(x, (2, 3), return_scratch=True)  # (N, C, 1, 1), biased; one pass
        bn_mean = bn_var = None
        k = 0
        if self.use_bn:
            if self.training:
                k, n, m = split_gpus(
                    self.norm_name, x, self.per_gpu_batch, fix="set use_bn=false or use more images per GPU"
                )
                self._update_running(m_in, v_in, k, n, m)
            else:
                # (a warning would split a compiled graph; the trainer re-estimates before every evaluation)
                if self.inference == "batch_average" and self._stale_batch_average and not compiling():
                    warnings.warn(
                        "sn: inference='batch_average' but the BN-part statistics were not re-estimated "
                        "since the last training step; call normbench.norms.reestimate_batch_average "
                        "before eval",
                        stacklevel=2,
                    )
                    self._stale_batch_average = False
                bn_mean, bn_var = self.running_mean, self.running_var
        eps = self.eps
        if bn_mean is not None:

            def coeffs(mi, vi, lm, lv, w, b, bm, bv):
                return _sn_coeffs(mi, vi, lm, lv, w, b, bm, bv, 0, eps)

            extra = (bn_mean, bn_var)
        else:

            def coeffs(mi, vi, lm, lv, w, b):
                return _sn_coeffs(mi, vi, lm, lv, w, b, None, None, k, eps)

            extra = ()
        return stats_affine(
            x, m_in, v_in, coeffs, self.mean_weight, self.var_weight, self.weight, self.bias, *extra, centered=scratch
        )

    @torch.no_grad()
    def _update_running(self, m_in: Tensor, v_in: Tensor, k: int, n: int, m: int) -> None:
        C = self.num_channels
        m_bn, v_bn = _pooled(m_in.view(n, k, C), v_in.view(n, k, C), 0)
        m_bn, v_bn = m_bn[0], v_bn[0] * (m / (m - 1))
        self.num_batches_tracked.add_(1)
        self.running_mean.lerp_(m_bn.mean(0).to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(v_bn.mean(0).to(self.running_var.dtype), self.momentum)
        if self.inference == "batch_average":
            self._stale_batch_average = True


def switchable_importance(model: nn.Module) -> dict[str, dict]:
    """``{qualified_name: {"mean": {"in", "ln", "bn"}, "var": {...}}}`` (python floats, softmax of the control
    logits; bn = 0.0 when the layer has no BN part) for every Switchable Norm layer in ``model``."""
    return {name: m.importance() for name, m in model.named_modules() if isinstance(m, SwitchableNorm2d)}


@torch.no_grad()
def reestimate_batch_average(model: nn.Module, batches: Iterable, reduce=None) -> None:
    """SN ``inference="batch_average"``: re-estimate the BN-part statistics of every SN layer whose
    ``inference == "batch_average"`` (moving-average layers are left alone) from ``batches``.

    Runs the model in train mode under no_grad on each batch (a tensor, or a tuple/list whose first element
    is the input), then sets each such layer's running mean / variance to the plain average over all
    emulated GPUs of all batches of each GPU's (mean, unbiased variance). Every other buffer in the model
    (other norms' running stats, step counters) and every module's train/eval flag is restored afterwards.
    The mechanism is :func:`normbench.norms.reestimate.reestimate_statistics` (PreciseBN's too); ``reduce``
    (an all-reduce sum across DDP ranks) makes several processes give one emulating process's statistics.
    """
    from .reestimate import reestimate_statistics

    layers = [
        m for m in model.modules() if isinstance(m, SwitchableNorm2d) and m.use_bn and m.inference == "batch_average"
    ]
    if not layers:
        return
    try:
        reestimate_statistics(model, layers, batches, variance="batch_average", reduce=reduce)
    except NormConfigError as err:
        raise NormConfigError(f"sn: {err}") from None
    for m in layers:
        m._stale_batch_average = False
