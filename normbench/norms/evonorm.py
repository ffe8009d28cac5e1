"""EvoNorm-B0 and EvoNorm-S0 (Liu et al. 2020), following timm's reference implementations.

B0:  y = x / max(sqrt(var_batch + eps), v * x + sqrt(var_instance + eps)) * weight + bias
     var_batch: biased, over (n, H, W) per channel and per emulated GPU (``per_gpu_batch``); the running
     average (unbiased, average over GPUs of each GPU's update, PyTorch momentum) replaces it at eval.
     var_instance: biased, over (H, W) per sample and channel. v init 1.
S0:  y = x * sigmoid(v * x) / sqrt(var_group + eps) * weight + bias, var_group biased over (C/G, H, W)
     per sample, ``groups``=32 (must divide C). v init 1. Same in train and eval.

Eager mode runs each layer as one autograd Function (``_EvoB0``, ``_EvoS0``) that saves only x and small
per-(n, c) statistics and recomputes the elementwise terms in its hand-written backward: autograd's version
allocated and saved about ten full-size temporaries per call (13x / 7x nn.BatchNorm2d's time on the CPU).
On NCHW float CPU tensors the Function's full-size passes are numba kernels (:mod:`._cpu_kernels`: B0 1.0-1.2x
and S0 0.5-0.8x BN forward+backward, against 2.6-3.2x and 1.9-2.2x in tensor ops); elsewhere (CUDA,
channels_last, numba missing, ``NORMBENCH_CPU_KERNELS=0``) the same equations in tensor ops.
Under ``torch.compile`` (:func:`compiling`) the same equations run as plain tensor ops, which inductor fuses.
``torch.maximum``'s tie (``v x + r == l``) sends the whole gradient to the batch-std side in both paths.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._common import (
    NormLayer,
    PerGPULayer,
    add_affine,
    check_channels,
    check_eps,
    check_input,
    check_int,
    gpu_view,
    init_batch_layer,
    split_gpus,
)
from ._fused import compiling
from .group_norm import resolve_groups

__all__ = ["EvoNorm2dB0", "EvoNorm2dS0"]


def kernels_switched_off() -> bool:
    """``NORMBENCH_CPU_KERNELS=0`` (read per call: the tests flip it) sends EvoNorm to its tensor ops."""
    return os.environ.get("NORMBENCH_CPU_KERNELS", "1") == "0"


def _use_kernels(x: Tensor) -> bool:
    """The fused CPU kernels (:mod:`._cpu_kernels`) run on NCHW float CPU tensors unless switched off."""
    if x.device.type != "cpu" or not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64):
        return False
    return not kernels_switched_off() and _kernels() is not None


@functools.cache
def _kernels():
    """The kernel module, imported on first use (numba's import costs ~0.5 s); None where numba is missing."""
    try:
        from . import _cpu_kernels
    except ImportError:  # numba is a dependency, but a bare environment (a GPU image) may lack it
        return None
    return _cpu_kernels


def _np_view(t: Tensor, *shape: int) -> np.ndarray:
    """A contiguous tensor as a numpy view of ``shape`` (no copy: the kernels' writes go to the tensor)."""
    return t.detach().view(*shape).numpy()


def _rows(t: Tensor) -> np.ndarray:
    """A contiguous (N, C, H, W) tensor as its (N*C, H*W) rows."""
    N, C, H, W = t.shape
    return _np_view(t, N * C, H * W)


def _vec(t: Tensor) -> np.ndarray:
    """A small tensor (per row or per channel) as a flat contiguous numpy array."""
    return t.detach().contiguous().view(-1).numpy()


def _vecs(like: Tensor, *params: Tensor) -> list[np.ndarray]:
    """Parameters in ``like``'s dtype as flat numpy arrays (the kernels' arithmetic runs in one dtype)."""
    return [_vec(p.detach().to(like.dtype)) for p in params]


def _instance_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var) over (H, W) as (N, C, 1, 1), and the centered ``x - mean`` (a fresh buffer the caller
    may overwrite). Two passes (CPU ``torch.var`` is a slow Welford pass); the squared norm of each contiguous
    (H, W) row reads the centered tensor once."""
    N, C, H, W = x.shape
    mean = x.mean((2, 3), keepdim=True)
    d = x - mean
    rows = d.view(N * C, H * W) if d.is_contiguous() else d
    sq = torch.linalg.vector_norm(rows, dim=-1 if d.is_contiguous() else (2, 3)).square_()
    return mean, sq.view(N, C, 1, 1).div_(H * W), d


def _channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum of a full-size (N, C, H, W) tensor: the contiguous (H, W) rows first: one reduction over
    (0, 2, 3) ran 2-3x slower on the CPU here."""
    return t.sum((2, 3)).sum(0)


def _per_image(t: Tensor, k: int, n: int) -> Tensor:
    """(k, C) per-GPU values -> (N, C, 1, 1): image ``a * k + j`` gets GPU ``j``'s (see split_gpus)."""
    return t.unsqueeze(0).expand(n, *t.shape).reshape(n * k, t.shape[1], 1, 1)


def _per_gpu(t: Tensor, k: int, n: int) -> Tensor:
    """(N, C, 1, 1) per-image values -> (k, C) sums over each GPU's images."""
    return t.view(n, k, -1).sum(0)


class _EvoB0(torch.autograd.Function):
    """EvoNorm-B0 with den = max(l, z), z = v x + r, r = sqrt(var_i + eps) per (n, c), l = sqrt(var_b + eps)
    per (GPU, c) in training (running variance in eval: a constant). Gradient, with t = g / den,
    k = g x / den^2 and the mask m = [z > l]:
        grad_x = w (t - v m k) + P x + Q   (P, Q per (n, c): the paths through r and, in training, l)
        grad_r = -w sum_hw m k,  grad_l = -w sum_hw (1 - m) k,  grad_v = -w sum m k x,  grad_w = sum t x
    and d r / d x = (x - mean_i) / (r H W), d l / d x = (x - mean_b) / (l M) over the GPU's M values.
    The mask is kept as sign(relu(z - l)) in a float buffer (bool tensors and torch.where are slow on the CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, v, left, right, mean_i, mean_b, gpus, scratch: list):
        C = x.shape[1]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        fused = scratch[0] is None  # the fused CPU kernels (the caller's statistics came from them)
        if fused:
            y = torch.empty_like(xf)
            _kernels().b0_forward(_rows(xf), _vec(left), _vec(right), *_vecs(xf, v, weight, bias), C, _rows(y))
        else:
            w, b, vv = (p.to(xf.dtype).view(1, C, 1, 1) for p in (weight, bias, v))
            # one broadcast operand per in-place pass (two in one op miss the CPU's vectorized loop, _fused.py);
            # den, then y, in the centered-x buffer the statistics left (a fresh 100 MB tensor costs page faults)
            den = torch.mul(xf, vv, out=scratch.pop()).add_(right).clamp_min_(left)
            y = torch.div(xf, den, out=den).mul_(w).add_(b)
        ctx.save_for_backward(xf, weight, v, left, right, mean_i, mean_b)
        ctx.gpus, ctx.x_dtype, ctx.fused = gpus, x.dtype, fused
        return y.to(torch.promote_types(x.dtype, weight.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        xf, weight, v, left, right, mean_i, mean_b = ctx.saved_tensors
        N, C, H, W = xf.shape
        dt = xf.dtype
        w, vv = weight.to(dt).view(1, C, 1, 1), v.to(dt).view(1, C, 1, 1)
        g = g.to(dt)
        if ctx.fused:
            g = g.contiguous()
            sums = torch.empty(N * C, 5, dtype=torch.float64)
            _kernels().b0_backward_sums(_rows(xf), _rows(g), _vec(left), _vec(right), _vecs(xf, v)[0], C, sums.numpy())
            s_tx, s_k, s_mk, s_mkx, s_g = (t.view(N, C, 1, 1) for t in sums.to(dt).unbind(1))
            g_w, g_b = s_tx.sum((0, 2, 3)), s_g.sum((0, 2, 3))
            g_v = -(s_mkx * w).sum((0, 2, 3))
        else:
            mask = torch.mul(xf, vv).add_(right - left).relu_()  # z - l where z > l, else 0
            inv_den = torch.add(mask, left).reciprocal_()
            grad_x = torch.mul(g, inv_den)  # t
            k_buf = inv_den.mul_(grad_x).mul_(xf)  # k = g x / den^2
            s_k = k_buf.sum((2, 3), keepdim=True)
            mk = k_buf.mul_(mask.sign_())  # m k
            s_mk = mk.sum((2, 3), keepdim=True)
            scratch = mask  # the mask is spent
            g_w = _channel_sum(torch.mul(grad_x, xf, out=scratch))
            g_v = -(torch.mul(mk, xf, out=scratch).sum((2, 3), keepdim=True) * w).sum((0, 2, 3))
            g_b = _channel_sum(g)
            grad_x.mul_(w).addcmul_(mk, -(w * vv))
        grad_r = -w * s_mk
        p_r = grad_r / (right * (H * W))
        p_coef, q_coef = p_r, -p_r * mean_i
        if ctx.gpus is not None:
            k, n = ctx.gpus
            grad_l = _per_image(_per_gpu(-w * (s_k - s_mk), k, n), k, n)
            p_l = grad_l / (left * (n * H * W))
            p_coef, q_coef = p_coef + p_l, q_coef - p_l * mean_b
        if ctx.fused:
            grad_x = torch.empty_like(xf)
            ops = (_rows(xf), _rows(g), _vec(left), _vec(right), *_vecs(xf, v, weight), _vec(p_coef), _vec(q_coef))
            _kernels().b0_backward_input(*ops, C, _rows(grad_x))
        else:
            grad_x.addcmul_(xf, p_coef).add_(q_coef)
        return grad_x.to(ctx.x_dtype), g_w.to(weight.dtype), g_b.to(weight.dtype), g_v.to(v.dtype), *(None,) * 6


class EvoNorm2dB0(PerGPULayer, nn.Module):
    """``evonorm_b0``."""

    norm_name = "evonorm_b0"

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
        fk = init_batch_layer(self, num_channels, per_gpu_batch, momentum, eps, device, dtype, running_mean=False)
        self.v = nn.Parameter(torch.ones(num_channels, **fk))

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        if compiling():
            return self._plain(x)
        N, C, H, W = x.shape
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        with torch.no_grad():
            if _use_kernels(xf):
                mean_i, var_i, centered = xf.new_empty(N, C, 1, 1), xf.new_empty(N, C, 1, 1), None
                _kernels().row_mean_var(_rows(xf), _vec(mean_i), _vec(var_i))
            else:
                mean_i, var_i, centered = _instance_stats(xf)
            right = torch.sqrt(var_i + self.eps)
            gpus = mean_b = None
            if self.training:
                k, n, m = split_gpus(self.norm_name, x, self.per_gpu_batch)
                gpus = (k, n)
                # each GPU's batch statistics from its images' instance statistics (law of total variance, exact:
                # every image holds H*W of the GPU's values)
                mean_gpu = mean_i.view(n, k, C).mean(0)
                var_gpu = (var_i + (mean_i - _per_image(mean_gpu, k, n)).square_()).view(n, k, C).mean(0)
                self.num_batches_tracked.add_(1)
                self.running_var.lerp_((var_gpu.mean(0) * (m / (m - 1))).to(self.running_var.dtype), self.momentum)
                left = _per_image(torch.sqrt(var_gpu + self.eps), k, n)
                mean_b = _per_image(mean_gpu, k, n)
            else:
                left = torch.sqrt(self.running_var.to(xf.dtype) + self.eps).view(1, C, 1, 1).expand(N, C, 1, 1)
        return _EvoB0.apply(x, self.weight, self.bias, self.v, left, right, mean_i, mean_b, gpus, [centered])

    def _plain(self, x: Tensor) -> Tensor:
        """The same layer in differentiable tensor ops, for torch.compile (inductor derives the backward)."""
        N, C, H, W = x.shape
        shape = (1, C, 1, 1)
        if self.training:
            k, n, m = split_gpus(self.norm_name, x, self.per_gpu_batch)
            x5 = gpu_view(x, k, n)
            mean = x5.mean((0, 3, 4), keepdim=True)
            var_b = (x5 - mean).square().mean((0, 3, 4), keepdim=True)  # (1, k, C, 1, 1) biased
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_var.lerp_(
                    (var_b.view(k, C).mean(0) * (m / (m - 1))).to(self.running_var.dtype), self.momentum
                )
            left = torch.sqrt(var_b + self.eps).expand(n, k, C, 1, 1).reshape(N, C, 1, 1)
        else:
            left = torch.sqrt(self.running_var + self.eps).view(shape)
        # max(l, r) = l + relu(r - l): the tie's gradient goes to l, as in the eager Function
        mean_i = x.mean(dim=(2, 3), keepdim=True)
        var_i = (x - mean_i).square().mean(dim=(2, 3), keepdim=True)
        right = torch.addcmul(torch.sqrt(var_i + self.eps) - left, x, self.v.view(shape))  # r - l
        y = x / (torch.relu(right) + left)
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))


def _per_channel(t: Tensor, C: int) -> Tensor:
    """(N, G, 1) per-group values -> (N, C, 1, 1), each channel its group's value (groups are contiguous)."""
    N, G, _ = t.shape
    return t.expand(N, G, C // G).reshape(N, C, 1, 1)


class _EvoS0(torch.autograd.Function):
    """EvoNorm-S0, y = u a + b with u = x s, s = sigmoid(v x), a = w / std_group per (n, c). Gradient:
        grad_x = a g (s + v e') + P x + Q,   e' = x s (1 - s)
        grad_w = sum_n R / std,  grad_v = sum_n a Z,  grad_b = sum g,
    with R = sum_hw g u, Z = sum_hw g x e' per (n, c), and through the group variance
    P = -(sum_{c in group} w R) / (std^3 M), Q = -P mean_group (M = C/G H W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, v, groups: int, eps: float):
        N, C, H, W = x.shape
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        ctx.fused = _use_kernels(xf)
        if ctx.fused:
            y, mean_g, inv_std = torch.empty_like(xf), xf.new_empty(N, groups, 1), xf.new_empty(N, groups, 1)
            chunks = (N * groups, C // groups, H * W)
            _kernels().s0_forward(
                _np_view(xf, *chunks), *_vecs(xf, v, weight, bias), eps, _np_view(y, *chunks),
                _vec(mean_g), _vec(inv_std),
            )  # fmt: skip
        else:
            w, b, vv = (p.to(xf.dtype).view(1, C, 1, 1) for p in (weight, bias, v))
            x5 = xf.view(N, groups, C // groups, H, W)  # a view in NCHW and channels_last alike
            mean_g = x5.mean((2, 3, 4), keepdim=True)
            # the centered x: squared norm for the variance, then y's buffer; y is this base tensor, not a view
            # of one (autograd forbids an in-place op, like the next ReLU, on a view made inside a Function)
            y = torch.empty_like(xf)
            d = torch.sub(x5, mean_g, out=y.view(N, groups, C // groups, H, W))
            rows = d.view(N, groups, -1) if d.is_contiguous() else d
            sq = torch.linalg.vector_norm(rows, dim=-1 if d.is_contiguous() else (2, 3, 4)).square_()
            mean_g, var_g = mean_g.view(N, groups, 1), sq.view(N, groups, 1) / (xf.numel() // (N * groups))
            inv_std = torch.rsqrt(var_g + eps)
            scale = _per_channel(inv_std, C) * w  # a
            torch.mul(xf, vv, out=y).sigmoid_().mul_(xf).mul_(scale).add_(b)
        ctx.save_for_backward(xf, weight, v, mean_g, inv_std)
        ctx.x_dtype = x.dtype
        return y.to(torch.promote_types(x.dtype, weight.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        xf, weight, v, mean_g, inv_std = ctx.saved_tensors
        N, C, H, W = xf.shape
        G = mean_g.shape[1]
        dt = xf.dtype
        w, vv = weight.to(dt).view(1, C, 1, 1), v.to(dt).view(1, C, 1, 1)
        g = g.to(dt)
        inv_c = _per_channel(inv_std, C)
        scale = inv_c * w
        if ctx.fused:
            g, grad_x = g.contiguous(), torch.empty_like(xf)
            chunks = (N * G, C // G, H * W)
            sums, coef = torch.empty(*chunks[:2], 3, dtype=torch.float64), xf.new_empty(N * G, 2)
            one = np.float64(1.0) if dt == torch.float64 else np.float32(1.0)
            _kernels().s0_backward(
                _np_view(xf, *chunks), _np_view(g, *chunks), *_vecs(xf, v, weight), _vec(mean_g), _vec(inv_std), one,
                _np_view(grad_x, *chunks), sums.numpy(), coef.numpy(),
            )  # fmt: skip
            r, z, s_g = (t.reshape(N, C, 1, 1) for t in sums.to(dt).unbind(2))
            g_b = s_g.sum((0, 2, 3))
        else:
            grad_x = torch.mul(xf, vv).sigmoid_()  # s
            buf = torch.mul(xf, grad_x).mul_(g)  # g u
            r = buf.sum((2, 3), keepdim=True)
            buf.addcmul_(buf, grad_x, value=-1)  # g x s (1 - s) = g e'
            grad_x.mul_(g).addcmul_(buf, vv)  # g (s + v e')
            z = buf.mul_(xf).sum((2, 3), keepdim=True)
            g_b = _channel_sum(g)
            count = xf.numel() // (N * G)
            p_coef = -(w * r).view(N, G, -1).sum(-1, keepdim=True) * inv_std.pow(3) / count
            q_coef = -p_coef * mean_g
            grad_x.mul_(scale).addcmul_(xf, _per_channel(p_coef, C)).add_(_per_channel(q_coef, C))
        g_w = (r * inv_c).sum((0, 2, 3))
        g_v = (z * scale).sum((0, 2, 3))
        return grad_x.to(ctx.x_dtype), g_w.to(weight.dtype), g_b.to(weight.dtype), g_v.to(v.dtype), None, None


class EvoNorm2dS0(NormLayer, nn.Module):
    """``evonorm_s0``."""

    norm_name = "evonorm_s0"

    @classmethod
    def _check(cls, groups, eps):
        check_int(cls.norm_name, "groups", groups, minimum=1)
        check_eps(cls.norm_name, eps)

    def __init__(self, num_channels: int, groups: int = 32, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self._check(groups, eps)
        self.num_channels = self.num_features = check_channels(self.norm_name, num_channels)
        self.groups = resolve_groups(self.norm_name, self.num_channels, groups, None)
        self.eps = float(eps)
        fk = {"device": device, "dtype": dtype}
        add_affine(self, num_channels, **fk)
        self.v = nn.Parameter(torch.ones(num_channels, **fk))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        if not compiling():
            return _EvoS0.apply(x, self.weight, self.bias, self.v, self.groups, self.eps)
        N, C, H, W = x.shape
        shape = (1, C, 1, 1)
        xg = x.view(N, self.groups, C // self.groups, H, W)
        var_g = xg.var(dim=(2, 3, 4), correction=0, keepdim=True)
        inv = torch.rsqrt(var_g + self.eps).expand(N, self.groups, C // self.groups, 1, 1).reshape(N, C, 1, 1)
        y = x * torch.sigmoid(x * self.v.view(shape)) * inv
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
