"""The fused CPU kernels of EvoNorm-B0/S0 (normbench/norms/_cpu_kernels.py) beyond the float64 reference tests
(which run on both paths through the ``evonorm_path`` fixture): long rows in float32 and float64 at one and two
threads (the serial and parallel builds) against the float64 formula, NaN propagation (the kernels' fast-math
flags must not drop it), bf16 input, numba missing, and the float32 exp against float64's."""

import math

import pytest
import torch

from normbench.norms import build_norm, evonorm

from float64 import leaf_copies, rand, set_affine
from test_norms_batch import ref_evonorm_b0
from test_norms_sample import ref_evonorm_s0

LAYERS = [("evonorm_b0", {"per_gpu_batch": 2}), ("evonorm_s0", {"groups": 4})]


def build(name, opts, C, dtype=torch.float64):
    layer = set_affine(build_norm(name, C, **opts).double())
    with torch.no_grad():
        layer.v.copy_(rand(C, seed=7))
    return layer.to(dtype)


def reference(name, x, ps, n):
    if name == "evonorm_b0":
        return ref_evonorm_b0(x, ps["weight"], ps["bias"], ps["v"], n)
    return ref_evonorm_s0(x, ps["weight"], ps["bias"], ps["v"], 4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,opts", LAYERS)
def test_long_rows_vs_float64_formula(name, opts, dtype, threads, evonorm_path):
    """28x27 rows (vectorized loops with remainders), the layer in float32 or float64 against the float64
    formula on the same values: output and every gradient, on both paths; one thread runs the kernels' serial
    build, two their parallel one."""
    torch.set_num_threads(threads)  # the autouse _one_thread fixture restores it
    C = 16
    x64 = rand(4, C, 28, 27) * 2.0 + 0.5
    layer = build(name, opts, C, dtype)
    ps = leaf_copies(build(name, opts, C), ["weight", "bias", "v"])
    x = x64.to(dtype, copy=True).requires_grad_()
    xr = x64.clone().requires_grad_()
    y, ref = layer(x), reference(name, xr, ps, 2)
    gy = rand(*x.shape, seed=3)
    y.backward(gy.to(dtype))
    ref.backward(gy)
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(x.grad, xr.grad)
        for k, p in ps.items():
            torch.testing.assert_close(getattr(layer, k).grad, p.grad, msg=k)
    else:
        scale = lambda t: t.abs().max().item()  # noqa: E731
        assert (y.double() - ref).abs().max().item() <= 1e-5 * scale(ref)
        assert (x.grad.double() - xr.grad).abs().max().item() <= 1e-4 * scale(xr.grad)
        for k, p in ps.items():
            assert (getattr(layer, k).grad.double() - p.grad).abs().max().item() <= 1e-4 * scale(p.grad), k
    evonorm_path.expect()
    used = {b for b, n in evonorm_path.builds.items() if n}
    assert used == (set() if not evonorm_path.fused else {"serial" if threads == 1 else "parallel"}), used


@pytest.mark.parametrize("name,opts", LAYERS)
def test_nan_propagates(name, opts, evonorm_path):
    """A NaN in x comes out as NaN where the formula puts it (its row, its group, its GPU's channel), not as a
    finite number: the trainer's divergence check depends on it."""
    C = 8
    layer = build(name, opts, C, torch.float32)
    x = rand(4, C, 5, 6).float()
    x[1, 2, 3, 4] = math.nan
    y = layer(x)
    ps = leaf_copies(build(name, opts, C), ["weight", "bias", "v"])
    expected = reference(name, x.double(), ps, 2).isnan()
    assert expected.any() and not expected.all()
    assert torch.equal(y.isnan(), expected)
    evonorm_path.expect()


@pytest.mark.parametrize("name,opts", LAYERS)
def test_bf16_input_runs_on_its_float32_copy(name, opts, evonorm_path):
    C = 8
    layer = build(name, opts, C, torch.float32)
    x = (rand(4, C, 5, 6) * 2.0 + 0.5).bfloat16().requires_grad_()
    y = layer(x)
    assert y.dtype == torch.float32  # promote(bf16 input, float32 parameters), as in the tensor-op path
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    ps = leaf_copies(build(name, opts, C), ["weight", "bias", "v"])
    torch.testing.assert_close(y.double(), reference(name, x.detach().double(), ps, 2).detach(), rtol=1e-5, atol=1e-5)
    evonorm_path.expect()


def test_without_numba_the_tensor_ops_run(monkeypatch):
    """Where numba cannot be imported (a bare GPU image), the layers take the tensor-op path."""
    monkeypatch.setenv("NORMBENCH_CPU_KERNELS", "1")
    monkeypatch.setattr(evonorm, "_kernels", lambda: None)
    for name, opts in LAYERS:
        layer = build(name, opts, 8)
        x = rand(4, 8, 5, 6)
        ps = leaf_copies(layer, ["weight", "bias", "v"])
        torch.testing.assert_close(layer(x), reference(name, x, ps, 2).detach())


def test_vectorizable_exp32_within_one_ulp_and_keeps_nan():
    """The kernels' float32 exp (plain arithmetic, so loops vectorize) against float64 exp on a fine grid of
    [-87, 88]: under one float32 ulp of relative error; NaN in, NaN out; clamped outside (finite, right side)."""
    import numba
    import numpy as np

    from normbench.norms import _cpu_kernels

    @numba.njit
    def exp_all(a, out):
        for i in range(a.shape[0]):
            out[i] = _cpu_kernels._exp32(a[i])

    a = np.linspace(-87.0, 88.0, 1_000_001).astype(np.float32)
    out = np.empty_like(a)
    exp_all(a, out)
    ref = np.exp(a.astype(np.float64))
    assert (np.abs(out - ref) / ref).max() < 2.0**-23
    edge = np.array([np.nan, 1e4, -1e4], np.float32)
    out = np.empty_like(edge)
    exp_all(edge, out)
    assert np.isnan(out[0]) and out[1] > 1e38 and 0.0 <= out[2] < 1e-37
