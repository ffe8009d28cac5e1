"""Fused CPU kernels (numba) for the EvoNorm layers: each pass reads x (and g) once and keeps every per-element
term in registers.

In plain tensor ops EvoNorm-B0 costs ~20 full-size memory passes per forward+backward and S0 ~15, against
native BatchNorm's ~7, and a CPU step is memory-bound: 2.6-3.2x and 1.9-2.2x BN's time at ResNet-50 shapes
(``scripts/bench_norms.py``; inductor's fused version still 2.3x / 1.9x at 32x1024x14x14). These kernels do B0
in 8 passes and S0 in 4 (its group's slice stays in cache between a kernel's two loops), and S0's sigmoid
through an exp that vectorizes. Layout: NCHW-contiguous float32/float64 on the CPU (bf16 runs on its float32
copy); anything else (CUDA, channels_last) keeps the tensor-op path, which computes the same equations.
``NORMBENCH_CPU_KERNELS=0`` turns them off (the tests run both paths).

Sums accumulate in float64 whatever the input dtype. The fast-math flags allow reassociation (vectorized sums),
contraction (FMA) and signed-zero freedom only: no ``nnan``/``ninf``, so a NaN or inf in x still comes out of
the layer (the trainer's divergence check needs it). numba compiles on first use (a few seconds per dtype) and
caches the machine code next to this file (``cache=True``).
"""

from __future__ import annotations

import math
from types import FunctionType

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

__all__ = [
    "row_mean_var",
    "b0_forward",
    "b0_backward_sums",
    "b0_backward_input",
    "s0_forward",
    "s0_backward",
]

# reassoc: vectorized reductions; contract: FMA; nsz: signed zeros. Not nnan/ninf (NaN must propagate).
_FLAGS = {"reassoc", "contract", "nsz"}


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (LLVM bitcast; numba has no scalar view)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", fastmath=_FLAGS)
def _exp32(a):  # pragma: no cover - compiled
    """exp of a float32 in plain arithmetic, so LLVM vectorizes the loop around it (libm's expf is a scalar call:
    9 ms of S0's 10 ms forward at 32x1024x14x14). Cephes' expf: a = n ln2 + r, |r| <= ln2 / 2, a degree-6
    polynomial for exp(r), 2^n built from its exponent bits; under 1 ulp on [-87, 88] (tests/test_cpu_kernels.py).
    Outside, a is clamped: exp(-87) ~ 1.6e-38 and exp(88) ~ 1.7e38 are 0 and inf for a sigmoid's purpose. A NaN
    stays NaN (the comparisons are false for it, and r carries it through the polynomial)."""
    if a > np.float32(88.0):
        a = np.float32(88.0)
    if a < np.float32(-87.0):
        a = np.float32(-87.0)
    n = np.floor(a * np.float32(1.4426950408889634) + np.float32(0.5))
    r = a - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)  # ln2 in two parts (exact n * hi)
    p = np.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + np.float32(c)
    p = p * (r * r) + r + np.float32(1.0)
    return p * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


def _sigmoid(a):
    """1 / (1 + exp(-a)) in a's dtype (compiled through the overload below)."""
    return 1.0 / (1.0 + math.exp(-a))


@overload(_sigmoid, inline="always", jit_options={"fastmath": _FLAGS})
def _sigmoid_typed(a):
    if a == types.float32:
        return lambda a: np.float32(1.0) / (np.float32(1.0) + _exp32(-a))
    return lambda a: 1.0 / (1.0 + math.exp(-a))  # float64: libm's exp (the reference tests' precision)


class _Kernel:
    """A kernel in two builds: parallel over its rows (``prange``), with numba's thread count following torch's
    (``torch.set_num_threads``, OMP_NUM_THREADS), and serial for one thread. A one-thread call of the parallel
    build still wakes numba's whole OpenMP team, whose idle threads spin: two one-thread DDP processes on two
    cores ran 2x slower for it."""

    def __init__(self, fn):
        self.parallel = njit(parallel=True, cache=True, fastmath=_FLAGS)(fn)
        serial = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
        serial.__qualname__ = fn.__qualname__ + "_serial"  # its own cache file (numba keys the cache by qualname)
        self.serial = njit(cache=True, fastmath=_FLAGS)(serial)
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __call__(self, *args):
        n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        if n <= 1:
            return self.serial(*args)
        numba.set_num_threads(n)
        return self.parallel(*args)


@_Kernel
def row_mean_var(x, mean, var):  # pragma: no cover - compiled
    """Biased mean and variance of each row of x (R, L), two passes over the row (it stays in cache)."""
    R, L = x.shape
    for i in prange(R):
        s = 0.0
        for j in range(L):
            s += x[i, j]
        m = s / L
        q = 0.0
        for j in range(L):
            d = x[i, j] - m
            q += d * d
        mean[i] = m
        var[i] = q / L


@_Kernel
def b0_forward(x, left, right, v, w, b, C, y):  # pragma: no cover - compiled
    """y = x / max(l, v x + r) * w + b, row i = (n, c): l, r per row, v, w, b per channel c = i % C."""
    R, L = x.shape
    for i in prange(R):
        c = i % C
        lv, rv, vv, wv, bv = left[i], right[i], v[c], w[c], b[c]
        for j in range(L):
            xv = x[i, j]
            z = vv * xv + rv
            den = z if z > lv else lv
            y[i, j] = xv / den * wv + bv


@_Kernel
def b0_backward_sums(x, g, left, right, v, C, sums):  # pragma: no cover - compiled
    """Per row, with t = g / den, k = g x / den^2 and m = [v x + r > l]: sums[i] = (sum t x, sum k, sum m k,
    sum m k x, sum g)."""
    R, L = x.shape
    for i in prange(R):
        lv, rv, vv = left[i], right[i], v[i % C]
        s_tx = 0.0
        s_k = 0.0
        s_mk = 0.0
        s_mkx = 0.0
        s_g = 0.0
        for j in range(L):
            xv = x[i, j]
            gv = g[i, j]
            z = vv * xv + rv
            m = z > lv
            den = z if m else lv
            t = gv / den
            k = t * xv / den
            s_tx += t * xv
            s_k += k
            s_g += gv
            if m:
                s_mk += k
                s_mkx += k * xv
        sums[i, 0] = s_tx
        sums[i, 1] = s_k
        sums[i, 2] = s_mk
        sums[i, 3] = s_mkx
        sums[i, 4] = s_g


@_Kernel
def b0_backward_input(x, g, left, right, v, w, p, q, C, grad_x):  # pragma: no cover - compiled
    """grad_x = w t - w v m k + p x + q (p, q per row: the paths through r and l)."""
    R, L = x.shape
    for i in prange(R):
        c = i % C
        lv, rv, vv, wv, pv, qv = left[i], right[i], v[c], w[c], p[i], q[i]
        wvv = wv * vv
        for j in range(L):
            xv = x[i, j]
            gv = g[i, j]
            z = vv * xv + rv
            if z > lv:
                t = gv / z
                grad_x[i, j] = wv * t - wvv * t * xv / z + pv * xv + qv
            else:
                grad_x[i, j] = wv * gv / lv + pv * xv + qv


@_Kernel
def s0_forward(x, v, w, b, eps, y, mean, inv_std):  # pragma: no cover - compiled
    """x (N*G, C/G, L): per chunk (n, group) its mean and 1/sqrt(var + eps), then y = x sigmoid(v x) w / std + b."""
    R, Cg, L = x.shape
    G = v.shape[0] // Cg
    count = Cg * L
    for i in prange(R):
        c0 = (i % G) * Cg
        s = 0.0
        for c in range(Cg):
            for j in range(L):
                s += x[i, c, j]
        m = s / count
        q = 0.0
        for c in range(Cg):
            for j in range(L):
                d = x[i, c, j] - m
                q += d * d
        inv = 1.0 / math.sqrt(q / count + eps)
        mean[i] = m
        inv_std[i] = inv
        for c in range(Cg):
            vv, bv = v[c0 + c], b[c0 + c]
            a = w[c0 + c] * inv_std[i]
            for j in range(L):
                xv = x[i, c, j]
                y[i, c, j] = xv * _sigmoid(vv * xv) * a + bv


@_Kernel
def s0_backward(x, g, v, w, mean, inv_std, one, grad_x, sums, coef):  # pragma: no cover - compiled
    """Per chunk: sums[i, c] = (R, Z, sum g) with u = x s, s = sigmoid(v x), R = sum g u, Z = sum g x s (1 - s) x;
    then grad_x = a g (s + v x s (1 - s)) + P x + Q, a = w / std, P = -(sum_c w R) / (std^3 M), Q = -P mean.
    ``one`` is 1 in x's dtype (a float64 literal would turn float32 arithmetic into float64).
    The first loop parks s in grad_x's slice (in cache) for the second; ``coef`` (R, 2) in x's dtype holds P, Q
    (so the second loop's arithmetic stays in x's dtype)."""
    R, Cg, L = x.shape
    G = v.shape[0] // Cg
    count = Cg * L
    for i in prange(R):
        c0 = (i % G) * Cg
        inv = inv_std[i]
        wr = 0.0
        for c in range(Cg):
            vv = v[c0 + c]
            r_sum = 0.0
            z_sum = 0.0
            g_sum = 0.0
            for j in range(L):
                xv = x[i, c, j]
                gv = g[i, c, j]
                sv = _sigmoid(vv * xv)
                grad_x[i, c, j] = sv
                gu = gv * xv * sv
                r_sum += gu
                z_sum += gu * (one - sv) * xv
                g_sum += gv
            sums[i, c, 0] = r_sum
            sums[i, c, 1] = z_sum
            sums[i, c, 2] = g_sum
            wr += w[c0 + c] * r_sum
        coef[i, 0] = -wr * inv * inv * inv / count
        coef[i, 1] = -coef[i, 0] * mean[i]
        p, q = coef[i, 0], coef[i, 1]
        for c in range(Cg):
            vv = v[c0 + c]
            a = w[c0 + c] * inv
            for j in range(L):
                xv = x[i, c, j]
                sv = grad_x[i, c, j]
                grad_x[i, c, j] = a * g[i, c, j] * (sv + vv * xv * sv * (one - sv)) + p * xv + q
