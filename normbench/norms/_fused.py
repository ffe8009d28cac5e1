"""One fused normalize for every layer whose output is an affine map of x with statistics of x.

``stats_affine(x, mean, var, coeff_fn, *params)`` returns ``y = x * A + B`` where
``(A, B) = coeff_fn(mean, var, *params)`` are small (broadcastable) tensors and ``mean``/``var`` are the biased
mean/variance of ``x`` over the dimensions where they broadcast (computed once, detached, by the caller with
:func:`var_mean`). Given the centered ``x - mean`` that :func:`var_mean` leaves behind, the forward is two
in-place passes over it. The custom backward needs two reductions of the upstream gradient (``sum g`` and
``sum g*x``), a tiny autograd pass through ``coeff_fn`` on the small tensors, and ``grad_x = A g + P x + Q``
in the buffer of ``g*x`` -- instead of autograd's long chain of full-size temporaries. Per call: one large
allocation forward, one backward, as in native BatchNorm.

CPU speed rules behind the op choices (measured at 32x1024x14x14, ``scripts/bench_norms.py``): an elementwise op
with two operands broadcast along the contiguous inner dim (``addcmul(B, x, A)``) misses the vectorized loop
(2.0 ms); one in-place op per broadcast operand does not (``mul_`` 0.5 ms + ``add_`` 0.5 ms). A fresh large
tensor costs its page faults on first write (a 100 MB one: ~30 ms, 10x the arithmetic), so scratch is reused.

Used by Switchable Norm (statistics per (n, c), LN/BN ones derived from them), per-GPU BatchNorm and
Batch Renorm (statistics per (GPU, c) on an ``(n, k, C, H, W)`` view), FRN (mean 0). Not twice differentiable.

Under ``torch.compile`` (:func:`compiling`) both functions take plain differentiable tensor ops instead: the
custom backward's ``torch.autograd.grad`` would split the graph, while inductor fuses the plain formula
(statistics in float32, one scale-and-shift pass) and derives its backward itself. Same equations, so the
float64 reference tests hold on both paths (tests/test_compiled.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["compiling", "stats_affine", "sum_to", "var_mean"]


def compiling() -> bool:
    """True while ``torch.compile`` traces the caller: the layers then use plain tensor ops (one graph)."""
    return torch.compiler.is_compiling()


def var_mean(x: Tensor, dims, return_scratch: bool = False):
    """Biased (var, mean) over ``dims`` (keepdim), accumulated in float32 at least; detached in eager mode
    (the fused op differentiates through them itself), differentiable under ``torch.compile``.

    CUDA: ``torch.var_mean`` (one fused pass). CPU: two passes -- the mean, then the squared norm of the
    centered ``d = x - mean`` -- as stable as Welford and ~10x faster than CPU ``torch.var_mean`` at ResNet
    shapes. The norm is taken over the contiguous last dims first (a row-wise ``vector_norm`` reads ``d`` once
    and writes nothing big; over strided dims it is ~6x slower). With ``return_scratch`` also returns ``d``
    (float32 at least; None on CUDA), which :func:`stats_affine` turns into its output in place: that saves a
    large allocation (on CPU, page faults of fresh 100 MB blocks are a large part of a memory-bound op's time)
    and the ``x * A + B`` cancellation when ``|mean| >> std``.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    dims = tuple(sorted(d % x.dim() for d in dims))
    if compiling():
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return (var, mean, None) if return_scratch else (var, mean)
    with torch.no_grad():
        return _eager_var_mean(x, dims, return_scratch)


def _eager_var_mean(x: Tensor, dims: tuple, return_scratch: bool):
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return (var, mean, None) if return_scratch else (var, mean)
    mean = x.mean(dims, keepdim=True)
    d = x - mean
    rows, row_dim, rest = _rows_view(d, dims)
    sq = torch.linalg.vector_norm(rows, dim=row_dim, keepdim=True).square_()
    count = d.numel() // mean.numel()
    var = (sq.sum(rest, keepdim=True) if rest else sq).view(mean.shape).div_(count)
    return (var, mean, d) if return_scratch else (var, mean)


def _rows_view(d: Tensor, dims: tuple) -> tuple[Tensor, int, tuple]:
    """(view, row dim, other reduced dims): when ``d`` is contiguous and its trailing dims are all reduced they
    are merged into one row dim, so a single row-wise reduction covers them; otherwise the innermost reduced
    dim is the row dim."""
    trailing = 0
    while trailing < len(dims) and dims[-1 - trailing] == d.dim() - 1 - trailing:
        trailing += 1
    if trailing >= 2 and d.is_contiguous():
        return d.flatten(d.dim() - trailing), -1, dims[:-trailing]
    return d, dims[-1], dims[:-1]


def sum_to(t: Tensor, shape) -> Tensor:
    dims = [i for i, (s, ts) in enumerate(zip(shape, t.shape)) if s == 1 and ts != 1]
    return t.sum(dims, keepdim=True) if dims else t


class _StatsAffine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, mean: Tensor, var: Tensor, coeff_fn: Callable, centered: list, *params: Tensor
    ) -> Tensor:
        with torch.no_grad():
            a, b = coeff_fn(mean, var, *params)
        d = centered.pop() if centered else None
        # On CPU an elementwise op whose inner dim has two broadcast operands (addcmul(B, x, A)) falls off
        # the vectorized loop; in-place ops with one broadcast operand each are ~4x faster per pass.
        if d is not None and d.shape == x.shape and d.dtype in (a.dtype, torch.float64):
            # y = (x - mean) * A + (B + mean * A): in place on the centered scratch, no cancellation
            y = d.mul_(a.to(d.dtype)).add_((b + mean * a).to(d.dtype))
        else:
            # bf16/fp16 x: A and B are float32, so this runs in float32 (x*A + B in bf16 cancels
            # catastrophically when |mean| >> std) and rounds once below
            y = torch.mul(x, a if x.dtype in (torch.float32, torch.float64) else a.float()).add_(b)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        ctx.coeff_fn = coeff_fn
        ctx.save_for_backward(x, mean, var, *params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, mean, var, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        with torch.enable_grad():
            m = mean.detach().requires_grad_(True)
            v = var.detach().requires_grad_(True)
            ps = [p.detach().requires_grad_(bool(nd)) if p.is_floating_point() else p for p, nd in zip(params, needs)]
            a, b = ctx.coeff_fn(m, v, *ps)
        cdt = a.dtype
        gf = g if g.dtype == cdt else g.to(cdt)
        xf = x if x.dtype == cdt else x.to(cdt)
        g_b = sum_to(gf, b.shape)
        buf = gf * xf  # becomes grad_x's buffer below
        g_a = sum_to(buf, a.shape)
        wrt = [m, v] + [p for p, nd in zip(ps, needs) if nd]
        grads = torch.autograd.grad((a, b), wrt, (g_a, g_b), allow_unused=True)
        g_m = grads[0] if grads[0] is not None else torch.zeros_like(m)
        g_v = grads[1] if grads[1] is not None else torch.zeros_like(v)
        count = x.numel() // mean.numel()
        # d mean / dx = 1/M ; d var(biased) / dx = 2 (x - mean) / M, so grad_x = A g + P x + Q with
        p_coef = g_v * (2.0 / count)
        q_coef = g_m / count - p_coef * m.detach()
        grad_x = None
        if ctx.needs_input_grad[0]:
            # one broadcast operand per pass (see forward); in the compute dtype (float32 for bf16 x: the same
            # cancellation as in forward, Q ~ -P * mean), rounded once
            grad_x = torch.mul(xf, p_coef, out=buf).add_(q_coef).addcmul_(gf, a.detach())
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        out = [grad_x, None, None, None, None]
        it = iter(grads[2:])
        for nd in needs:
            out.append(next(it) if nd else None)
        return tuple(out)


def stats_affine(
    x: Tensor, mean: Tensor, var: Tensor, coeff_fn: Callable, *params: Tensor, centered: Tensor | None = None
) -> Tensor:
    """y = x * A + B with (A, B) = coeff_fn(mean, var, *params); mean/var: biased stats of x (see module doc).
    ``centered``: ``x - mean`` as returned by ``var_mean(..., return_scratch=True)``, owned by nobody else;
    it is overwritten with y. Under ``torch.compile``, mean/var are differentiable (see :func:`var_mean`) and
    y is the plain ``(x - mean) * A + (B + mean * A)``, in float32 at least (no cancellation when
    ``|mean| >> std``), rounded once to x's dtype."""
    if compiling():
        a, b = coeff_fn(mean, var, *params)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.to(a.dtype)
        return ((xf - mean) * a + (b + mean * a)).to(x.dtype)
    return _StatsAffine.apply(x, mean.detach(), var.detach(), coeff_fn, [centered], *params)
