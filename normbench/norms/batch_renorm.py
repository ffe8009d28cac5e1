"""Batch Renormalization (Ioffe 2017), with per-GPU statistics.

Training (per emulated GPU of ``per_gpu_batch`` images, like :class:`PerGPUBatchNorm2d`):
    s_B = sqrt(var_B + eps) (biased var_B),  s = sqrt(running_var + eps)
    r = clip(s_B / s, 1/rmax, rmax),  d = clip((m_B - running_mean) / s, -dmax, dmax)   (both detached)
    x_hat = (x - m_B) / s_B * r + d,   y = x_hat * weight + bias
r and d use the running statistics BEFORE this step's update; the update itself is BN's (average over GPUs
of each GPU's update, unbiased variance). ``rmax=1, dmax=0`` is exactly BN. Eval uses the running stats.

Options (fixed clip values OR a schedule; the names are normbench's):
    rmax, dmax            fixed values; default 1.5 / 0.5 (the GN paper's best on ResNet-50). Not allowed
                          together with ``schedule=True``.
    schedule=True         BN for ``warmup_steps`` steps, then linear ramps:
                          rmax = 1 + (rmax_max - 1) * clamp((step - warmup_steps) / (rmax_steps - warmup_steps), 0, 1)
                          dmax = dmax_max * clamp((step - warmup_steps) / (dmax_steps - warmup_steps), 0, 1)
                          defaults warmup_steps=5000, rmax_max=3, rmax_steps=40000, dmax_max=5, dmax_steps=25000
                          (rmax_steps / dmax_steps are absolute step numbers at which the maxima are reached).
``step`` is the layer's own ``num_batches_tracked`` buffer (checkpointed; counts training forwards, 0 at the
first one) and the schedule is evaluated with tensor ops (no ``.item()``, no host sync).

The training forward READS running statistics, so under DDP the trainer must keep buffers identical across
ranks every step (``reads_running_stats_in_training`` reports it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    NormConfigError,
    PerGPULayer,
    check_bool,
    check_float,
    check_input,
    check_int,
    gpu_view,
    init_batch_layer,
    split_gpus,
)
from ._fused import stats_affine, var_mean

__all__ = ["BatchRenorm2d"]


def _brn_coeffs(mean, var, weight, bias, r, d, eps):
    c = weight.numel()
    w = weight.view(1, 1, c, 1, 1)
    a = w * r * torch.rsqrt(var + eps)
    return a, bias.view(1, 1, c, 1, 1) + w * d - mean * a


def _snapshot(buffer: Tensor) -> Tensor:
    """The buffer's value before this step's in-place update (same shape).

    A plain read is enough in eager mode. Under torch.compile (torch 2.14) inductor's partitioner saved the
    buffer itself for the backward and recomputed r and d there from it, i.e. from the value AFTER this
    step's ``lerp_`` (weight and input gradients 1-7% off the float64 formula; tests/test_compiled.py).
    The partitioner never recomputes a reduction whose output is 4x smaller than its input, so the value is
    read through an exact one: the max over 8 identical copies (an expanded view, nothing is copied)."""
    return buffer.detach().reshape(1, -1).expand(8, -1).amax(0).view(buffer.shape)


class BatchRenorm2d(PerGPULayer, nn.Module):
    """``brn``: Batch Renorm with fixed or scheduled rmax/dmax (see module docstring)."""

    norm_name = "brn"
    reads_running_stats_in_training = True

    @classmethod
    def _check(
        cls,
        rmax,
        dmax,
        schedule,
        warmup_steps,
        rmax_max,
        rmax_steps,
        dmax_max,
        dmax_steps,
        per_gpu_batch,
        momentum,
        eps,
    ):
        L = cls.norm_name
        check_float(L, "rmax", rmax, low=1.0, allow_none=True)
        check_float(L, "dmax", dmax, low=0.0, allow_none=True)
        check_bool(L, "schedule", schedule)
        check_int(L, "warmup_steps", warmup_steps, minimum=0)
        check_float(L, "rmax_max", rmax_max, low=1.0)
        check_int(L, "rmax_steps", rmax_steps, minimum=1)
        check_float(L, "dmax_max", dmax_max, low=0.0)
        check_int(L, "dmax_steps", dmax_steps, minimum=1)
        super()._check(per_gpu_batch, momentum, eps)
        if schedule:
            if rmax is not None or dmax is not None:
                raise NormConfigError(
                    f"{L}: rmax={rmax}/dmax={dmax} are fixed values but schedule=true; with a "
                    f"schedule set rmax_max/dmax_max instead (or schedule=false)"
                )
            for key, val in (("rmax_steps", rmax_steps), ("dmax_steps", dmax_steps)):
                if val <= warmup_steps:
                    raise NormConfigError(
                        f"{L}: {key}={val} must be > warmup_steps={warmup_steps} "
                        f"(absolute step at which the maximum is reached)"
                    )

    def __init__(
        self,
        num_channels: int,
        rmax: float | None = None,
        dmax: float | None = None,
        schedule: bool = False,
        warmup_steps: int = 5000,
        rmax_max: float = 3.0,
        rmax_steps: int = 40000,
        dmax_max: float = 5.0,
        dmax_steps: int = 25000,
        per_gpu_batch: int | None = None,
        momentum: float = 0.1,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._check(
            rmax, dmax, schedule, warmup_steps, rmax_max, rmax_steps, dmax_max, dmax_steps, per_gpu_batch, momentum, eps
        )
        init_batch_layer(self, num_channels, per_gpu_batch, momentum, eps, device, dtype)
        self.schedule = schedule
        self.rmax = 1.5 if rmax is None else float(rmax)
        self.dmax = 0.5 if dmax is None else float(dmax)
        self.warmup_steps, self.rmax_max, self.rmax_steps = int(warmup_steps), float(rmax_max), int(rmax_steps)
        self.dmax_max, self.dmax_steps = float(dmax_max), int(dmax_steps)

    def extra_repr(self) -> str:
        if self.schedule:
            clip = (
                f"schedule: warmup_steps={self.warmup_steps}, rmax 1->{self.rmax_max} by {self.rmax_steps}, "
                f"dmax 0->{self.dmax_max} by {self.dmax_steps}"
            )
        else:
            clip = f"rmax={self.rmax}, dmax={self.dmax}"
        return (
            f"{self.num_channels}, {clip}, per_gpu_batch={self.per_gpu_batch}, momentum={self.momentum}, eps={self.eps}"
        )

    def current_limits(self):
        """(rmax, dmax) for the next training step: floats (fixed) or 0-dim tensors (schedule)."""
        if not self.schedule:
            return self.rmax, self.dmax
        t = (_snapshot(self.num_batches_tracked) - self.warmup_steps).clamp_min(0).to(self.running_mean.dtype)
        rmax = 1.0 + (self.rmax_max - 1.0) * (t / (self.rmax_steps - self.warmup_steps)).clamp(max=1.0)
        dmax = self.dmax_max * (t / (self.dmax_steps - self.warmup_steps)).clamp(max=1.0)
        return rmax, dmax

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        k, n, m = split_gpus(self.norm_name, x, self.per_gpu_batch)
        N, C, H, W = x.shape
        x5 = gpu_view(x, k, n)
        var, mean, scratch = var_mean(x5, (0, 3, 4), return_scratch=True)  # (1, k, C, 1, 1), biased
        # r and d are constants of the step (not differentiated through), from this step's statistics and the
        # running statistics BEFORE this step's update
        rmax, dmax = self.current_limits()
        var_d, mean_d = var.detach(), mean.detach()
        rm = _snapshot(self.running_mean).view(1, 1, C, 1, 1).to(var.dtype)
        rv = _snapshot(self.running_var).view(1, 1, C, 1, 1).to(var.dtype)
        s = torch.sqrt(rv + self.eps)
        s_b = torch.sqrt(var_d + self.eps)
        if isinstance(rmax, Tensor):
            r = torch.minimum(torch.maximum(s_b / s, 1.0 / rmax), rmax)
            d = torch.minimum(torch.maximum((mean_d - rm) / s, -dmax), dmax)
        else:
            r = (s_b / s).clamp(1.0 / rmax, rmax)
            d = ((mean_d - rm) / s).clamp(-dmax, dmax)
        eps = self.eps
        y = stats_affine(
            x5,
            mean,
            var,
            lambda mu, v, w, b, r_, d_: _brn_coeffs(mu, v, w, b, r_, d_, eps),
            self.weight,
            self.bias,
            r,
            d,
            centered=scratch,
        )
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.view(k, C).mean(0).to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var.view(k, C).mean(0) * (m / (m - 1))).to(self.running_var.dtype), self.momentum)
        return y.view(N, C, H, W)
