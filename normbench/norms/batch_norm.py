"""BatchNorm2d with per-GPU statistics, emulated on one device.

The papers compute BN statistics per GPU and never synchronize them (8 GPUs x b images). A training batch of
N = k x ``per_gpu_batch`` images is treated as k emulated GPUs; GPU ``j`` holds images ``j, j + k, j + 2k, ...``
(``_common.split_gpus``: the same assignment in every per-GPU layer and in the data layer's rank slicing).
Each GPU's images are normalized with their own mean and biased variance over (n, H, W).

Because the batch is image-major, ``x.view(n, k * C, H, W)`` gives every (GPU, channel) pair its own channel
without a copy: per-GPU BN is ONE native ``F.batch_norm`` call over that reshaped batch, with weight, bias and
running statistics repeated k times (``impl="view"``, the default for contiguous NCHW input; as fast as plain BN).
A channels_last batch cannot be viewed that way. On the CPU it takes ``impl="fused"``: one ``var_mean`` over
a ``(n, k, C, H, W)`` view and one fused affine with a custom backward (``_fused.py``). On CUDA it takes the view
path through a layout copy (``reshape`` copies, and the output is copied back to channels_last): on an H200 the
fused path ran a ResNet-50 bf16 step at 0.8x GN's images/s and 3x nn.BatchNorm2d's layer time, while a copy of a
ResNet-50 activation costs a few hundredths of a millisecond there (results/benchmarks/h200_*). No Python loop
over GPUs.

Running statistics (state this in every report): each GPU would apply the usual update
``running = (1 - momentum) * running + momentum * stat_gpu`` (unbiased variance, as ``nn.BatchNorm2d``);
the layer stores the **average over the k GPUs of those updates**, i.e.
``running = (1 - momentum) * running + momentum * mean_k(stat_gpu)``. This is what DDP with per-GPU BN
would hold if running statistics were averaged across ranks (rather than broadcast from rank 0, trap 3 in
docs/papers.md section 4). Eval uses the running statistics.

Deliberately NOT a subclass of ``nn.modules.batchnorm._BatchNorm``: ``nn.SyncBatchNorm.convert_sync_batchnorm``
leaves it alone, so a generic DDP "sync BN" preset cannot silently turn per-GPU BN into SyncBN (use ``syncbn``
for that). ``is_norm_layer`` still recognizes it; its state-dict keys match ``nn.BatchNorm2d``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    NormLayer,
    PerGPULayer,
    check_channels,
    check_eps,
    check_input,
    check_momentum,
    gpu_view,
    init_batch_layer,
    split_gpus,
)
from ._fused import compiling, stats_affine, var_mean

__all__ = ["PerGPUBatchNorm2d", "SyncBatchNorm2d", "chunked_batch_norm"]

# "auto": "view" for contiguous NCHW input and for any CUDA input, "fused" for non-contiguous CPU input. Both are
# tested against k separate BNs; scripts/bench_norms.py times both.
PER_GPU_IMPL = "auto"


def _bn_coeffs(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float):
    c = weight.numel()
    a = weight.view(1, 1, c, 1, 1) * torch.rsqrt(var + eps)
    return a, bias.view(1, 1, c, 1, 1) - mean * a


def chunked_batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor,
    bias: Tensor,
    k: int,
    n: int,
    momentum: float,
    eps: float,
    impl: str | None = None,
) -> Tensor:
    """Training-mode BN with per-GPU statistics (k GPUs of n images, GPU j = images j, j+k, ...); updates the
    running stats in place with the average over GPUs of each GPU's update."""
    impl = impl or PER_GPU_IMPL
    if impl not in ("auto", "view", "fused"):
        raise ValueError(f"bn: unknown per-GPU implementation {impl!r}; use 'auto', 'view' or 'fused'")
    if k == 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    N, C, H, W = x.shape
    # Under torch.compile the (n, k, C, H, W) view path below is plain tensor ops that inductor fuses for any
    # layout; the view path's layout copies and repeated buffers would only add work to the graph.
    if not compiling() and (impl == "view" or (impl == "auto" and (x.is_contiguous() or x.device.type == "cuda"))):
        # (n, k*C, H, W) is a view of image-major x: channel j*C + c = channel c of GPU j (a copy if x is not
        # contiguous NCHW; the output then gets x's channels_last layout back)
        rm, rv = running_mean.repeat(k), running_var.repeat(k)
        y = F.batch_norm(x.reshape(n, k * C, H, W), rm, rv, weight.repeat(k), bias.repeat(k), True, momentum, eps)
        with torch.no_grad():
            running_mean.copy_(rm.view(k, C).mean(0))
            running_var.copy_(rv.view(k, C).mean(0))
        y = y.view(N, C, H, W)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return y
    x5 = gpu_view(x, k, n)
    var, mean, scratch = var_mean(x5, (0, 3, 4), return_scratch=True)  # (1, k, C, 1, 1), biased
    with torch.no_grad():
        m = n * H * W
        running_mean.lerp_(mean.view(k, C).mean(0).to(running_mean.dtype), momentum)
        running_var.lerp_((var.view(k, C).mean(0) * (m / (m - 1))).to(running_var.dtype), momentum)
    y = stats_affine(x5, mean, var, lambda mu, v, w, b: _bn_coeffs(mu, v, w, b, eps), weight, bias, centered=scratch)
    return y.view(N, C, H, W)


class PerGPUBatchNorm2d(PerGPULayer, nn.Module):
    """BatchNorm2d whose training statistics are computed per emulated GPU of ``per_gpu_batch`` images.

    Args:
        num_channels: C.
        per_gpu_batch: images per emulated GPU; None = the whole batch is one GPU (plain BN).
        momentum: PyTorch convention (weight of the new statistic), 0.1.
        eps: 1e-5.
    """

    norm_name = "bn"

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
        init_batch_layer(self, num_channels, per_gpu_batch, momentum, eps, device, dtype)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        k, n, _ = split_gpus(self.norm_name, x, self.per_gpu_batch)
        self.num_batches_tracked.add_(1)
        return chunked_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, k, n, self.momentum, self.eps
        )


class SyncBatchNorm2d(NormLayer, nn.BatchNorm2d):
    """``syncbn``: a plain ``nn.BatchNorm2d`` (statistics over the real process's whole batch) meant to be
    converted by the trainer with ``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP. On one process it
    is ordinary BN. (The conversion produces a built-in ``nn.SyncBatchNorm``.)"""

    norm_name = "syncbn"

    @classmethod
    def for_processes(cls, model: nn.Module, distributed: bool) -> nn.Module:
        """Under DDP the statistics span every process: torch's own SyncBatchNorm (one process: plain BN)."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if distributed else model

    @classmethod
    def _check(cls, momentum, eps):
        check_momentum(cls.norm_name, momentum)
        check_eps(cls.norm_name, eps)

    def __init__(self, num_channels: int, momentum: float = 0.1, eps: float = 1e-5, device=None, dtype=None):
        self._check(momentum, eps)
        super().__init__(
            check_channels(self.norm_name, num_channels), eps=eps, momentum=momentum, device=device, dtype=dtype
        )
