"""Per-GPU BatchNorm, SyncBN, Batch Renorm, EvoNorm-B0: float64 references written from docs/papers.md section 3."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms import NormConfigError, build_norm
from normbench.norms import batch_norm as bn_mod

from float64 import assert_grads_match, from_gpu_chunks, gpu_chunks, leaf_copies, rand, set_affine

SHAPES = [(4, 3, 6, 5), (6, 5, 3, 7), (8, 4, 1, 1), (2, 6, 4, 4)]


def ref_bn_train(x, w, b, n, eps=1e-5):
    """Per emulated GPU of n images (GPU j = images j, j+k, ...): (x - mean) / sqrt(biased var + eps) * w + b;
    returns y, per-GPU means, unbiased vars."""
    ys, means, uvars = [], [], []
    for c in gpu_chunks(x, n):
        M = c.shape[0] * c.shape[2] * c.shape[3]
        mean = c.sum(dim=(0, 2, 3)) / M
        dev = c - mean.view(1, -1, 1, 1)
        var = (dev * dev).sum(dim=(0, 2, 3)) / M
        ys.append(dev / torch.sqrt(var.view(1, -1, 1, 1) + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
        means.append(mean)
        uvars.append(var * M / (M - 1))
    return from_gpu_chunks(ys), torch.stack(means), torch.stack(uvars)


# ---------------------------------------------------------------- per-GPU BN


@pytest.mark.parametrize("impl", ["view", "fused"])
@pytest.mark.parametrize(
    "shape,n",
    [
        ((4, 3, 6, 5), 2),
        ((6, 5, 3, 7), 3),
        ((6, 5, 3, 7), 2),
        ((8, 4, 1, 1), 2),
        ((4, 3, 6, 5), None),
        ((1, 3, 6, 5), None),
    ],
)
def test_bn_train_eval_vs_formula(monkeypatch, impl, shape, n):
    monkeypatch.setattr(bn_mod, "PER_GPU_IMPL", impl)
    x = rand(*shape)
    layer = set_affine(build_norm("bn", shape[1], per_gpu_batch=n, momentum=0.3).double())
    with torch.no_grad():
        layer.running_mean.copy_(rand(shape[1], seed=5))
        layer.running_var.copy_(rand(shape[1], seed=6).abs() + 0.5)
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(x)
    ref, means, uvars = ref_bn_train(x, layer.weight.detach(), layer.bias.detach(), n or shape[0])
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # running stats: average over GPUs of each GPU's usual update
    torch.testing.assert_close(layer.running_mean, (0.7 * rm0 + 0.3 * means).mean(0))
    torch.testing.assert_close(layer.running_var, (0.7 * rv0 + 0.3 * uvars).mean(0))
    assert int(layer.num_batches_tracked) == 1
    layer.eval()
    ye = layer(x)
    refe = (x - layer.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        layer.running_var.view(1, -1, 1, 1) + 1e-5
    ) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ye, refe.detach())


def test_bn_one_chunk_equals_builtin():
    x = rand(5, 4, 6, 7)
    ours = set_affine(build_norm("bn", 4).double())
    ref = nn.BatchNorm2d(4).double()
    ref.load_state_dict(ours.state_dict())
    for _ in range(3):
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, k), getattr(ref, k), rtol=0, atol=0)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    # same with per_gpu_batch == N
    ours2 = build_norm("bn", 4, per_gpu_batch=5).double()
    torch.testing.assert_close(ours2(x), F.batch_norm(x, None, None, ours2.weight, ours2.bias, True), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["view", "fused"])
@pytest.mark.parametrize("k,n", [(4, 2), (3, 3)])
def test_bn_chunks_equal_separate_bns(monkeypatch, impl, k, n):
    monkeypatch.setattr(bn_mod, "PER_GPU_IMPL", impl)
    C = 5
    x = rand(k * n, C, 5, 3).requires_grad_()
    gy = rand(k * n, C, 5, 3, seed=9)
    ours = set_affine(build_norm("bn", C, per_gpu_batch=n).double())
    y = ours(x)
    y.backward(gy)
    xs = x.detach().clone().requires_grad_()
    refs = [nn.BatchNorm2d(C).double() for _ in range(k)]
    outs = []
    for i, r in enumerate(refs):
        r.load_state_dict({kk: v for kk, v in ours.state_dict().items() if kk in ("weight", "bias")}, strict=False)
        outs.append(r(gpu_chunks(xs, n)[i]))
    from_gpu_chunks(outs).backward(gy)
    torch.testing.assert_close(y, from_gpu_chunks(outs))
    torch.testing.assert_close(x.grad, xs.grad)
    torch.testing.assert_close(ours.weight.grad, sum(r.weight.grad for r in refs))
    torch.testing.assert_close(ours.bias.grad, sum(r.bias.grad for r in refs))
    torch.testing.assert_close(ours.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(ours.running_var, torch.stack([r.running_var for r in refs]).mean(0))


@pytest.mark.parametrize("impl", ["view", "fused"])
@pytest.mark.parametrize("n", [None, 2])
def test_bn_gradcheck(monkeypatch, impl, n):
    monkeypatch.setattr(bn_mod, "PER_GPU_IMPL", impl)
    layer = set_affine(build_norm("bn", 3, per_gpu_batch=n).double())
    x = rand(4, 3, 3, 2).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize(
    "name,opts",
    [
        ("bn", {"per_gpu_batch": 2}),
        ("bn", {}),
        ("brn", {"per_gpu_batch": 2}),
        ("evonorm_b0", {"per_gpu_batch": 2}),
        ("syncbn", {}),
    ],
)
@pytest.mark.parametrize("impl", ["auto", "view", "fused"])  # view: CUDA's path for channels_last
def test_batch_layers_keep_channels_last(monkeypatch, impl, name, opts):
    monkeypatch.setattr(bn_mod, "PER_GPU_IMPL", impl)
    x = rand(4, 6, 5, 3)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    a = set_affine(build_norm(name, 6, **opts).double())
    b = set_affine(build_norm(name, 6, **opts).double())
    ya, yb = a(x), b(xc)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya, yb)
    yb.sum().backward()
    a.eval(), b.eval()
    ye = b(xc)
    assert ye.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a(x), ye)


def test_bn_errors_and_syncbn():
    layer = build_norm("bn", 4, per_gpu_batch=3)
    with pytest.raises(ValueError, match=r"bn: batch of N=4 is not a multiple of per_gpu_batch=3"):
        layer(torch.randn(4, 4, 3, 3))
    one = build_norm("bn", 4, per_gpu_batch=1)
    with pytest.raises(NormConfigError, match=r"bn: .*n=1 .*1x1"):
        one(torch.randn(2, 4, 1, 1))
    out = one(torch.randn(2, 4, 2, 2))  # 1 image per GPU on a 2x2 map is defined
    assert torch.isfinite(out).all()
    sb = build_norm("syncbn", 8)
    assert isinstance(sb, nn.BatchNorm2d)
    conv = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(sb, build_norm("bn", 8, per_gpu_batch=2)))
    assert isinstance(conv[0], nn.SyncBatchNorm)
    assert not isinstance(conv[1], nn.SyncBatchNorm)  # per-GPU BN is never silently converted
    with pytest.raises(NormConfigError, match="syncbn: unknown option 'per_gpu_batch'"):
        build_norm("syncbn", 8, per_gpu_batch=2)


# ---------------------------------------------------------------- Batch Renorm


def ref_brn_train(x, w, b, rm, rv, n, rmax, dmax, eps=1e-5):
    ys = []
    for c in gpu_chunks(x, n):
        M = c.shape[0] * c.shape[2] * c.shape[3]
        mB = (c.sum(dim=(0, 2, 3)) / M).view(1, -1, 1, 1)
        vB = ((c - mB) ** 2).sum(dim=(0, 2, 3)).view(1, -1, 1, 1) / M
        sB = torch.sqrt(vB + eps)
        s = torch.sqrt(rv.view(1, -1, 1, 1) + eps)
        r = torch.clamp(sB / s, 1 / rmax, rmax).detach()
        d = torch.clamp((mB - rm.view(1, -1, 1, 1)) / s, -dmax, dmax).detach()
        ys.append(((c - mB) / sB * r + d) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
    return from_gpu_chunks(ys)


@pytest.mark.parametrize("shape,n", [((4, 3, 6, 5), 2), ((6, 5, 3, 7), 3), ((3, 6, 5, 7), None), ((4, 2, 1, 1), 2)])
@pytest.mark.parametrize("rmax,dmax", [(1.5, 0.5), (3.0, 5.0), (1.1, 0.05)])
def test_brn_vs_formula_values_and_grads(shape, n, rmax, dmax):
    C = shape[1]
    layer = set_affine(build_norm("brn", C, rmax=rmax, dmax=dmax, per_gpu_batch=n, momentum=0.2).double())
    with torch.no_grad():
        layer.running_mean.copy_(0.3 * rand(C, seed=3))
        layer.running_var.copy_(rand(C, seed=4).abs() + 0.5)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = rand(*shape).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    params = leaf_copies(layer, ("weight", "bias"))
    w, b = params["weight"], params["bias"]
    gy = rand(*shape, seed=8)
    y = layer(x)
    ref = ref_brn_train(xr, w, b, rm, rv, n or shape[0], rmax, dmax)
    torch.testing.assert_close(y, ref)
    y.backward(gy)
    ref.backward(gy)
    assert_grads_match(layer, x, xr, params)
    _, means, uvars = ref_bn_train(x.detach(), w.detach(), b.detach(), n or shape[0])
    torch.testing.assert_close(layer.running_mean, (0.8 * rm + 0.2 * means).mean(0))
    torch.testing.assert_close(layer.running_var, (0.8 * rv + 0.2 * uvars).mean(0))


def test_brn_rmax1_dmax0_is_bn():
    x = rand(6, 4, 5, 3).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    brn = set_affine(build_norm("brn", 4, rmax=1.0, dmax=0.0, per_gpu_batch=3).double())
    bn = set_affine(build_norm("bn", 4, per_gpu_batch=3).double())
    y1, y2 = brn(x), bn(xr)
    torch.testing.assert_close(y1, y2)
    y1.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    brn.eval(), bn.eval()
    torch.testing.assert_close(brn(x), bn(x))


@pytest.mark.parametrize("opts", [dict(rmax=1.0, dmax=0.0), dict(rmax=1.5, dmax=0.5)])
def test_brn_gradcheck(opts):
    # momentum 0 keeps the running stats fixed between gradcheck's forwards; with running stats far from the
    # batch's, r and d sit at their clip bounds, so the detached-r/d gradient equals the true one
    layer = set_affine(build_norm("brn", 3, per_gpu_batch=2, momentum=0.0, **opts).double())
    with torch.no_grad():
        layer.running_mean.fill_(10.0)
        layer.running_var.fill_(100.0)
    x = rand(4, 3, 3, 2).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


def test_brn_schedule_driven_by_step_buffer():
    layer = build_norm(
        "brn", 2, schedule=True, warmup_steps=2, rmax_max=3.0, rmax_steps=6, dmax_max=5.0, dmax_steps=4
    ).double()
    expected = {0: (1.0, 0.0), 2: (1.0, 0.0), 3: (1.5, 2.5), 4: (2.0, 5.0), 6: (3.0, 5.0), 9: (3.0, 5.0)}
    for step, (r, d) in expected.items():
        layer.num_batches_tracked.fill_(step)
        rmax, dmax = layer.current_limits()
        assert isinstance(rmax, torch.Tensor)
        assert float(rmax) == pytest.approx(r) and float(dmax) == pytest.approx(d)
    # step counter is a checkpointed buffer incremented by training forwards
    layer.num_batches_tracked.zero_()
    x = rand(4, 2, 3, 3)
    for _ in range(3):
        layer(x)
    assert "num_batches_tracked" in layer.state_dict() and int(layer.num_batches_tracked) == 3
    # values follow the formula with the scheduled limits
    with torch.no_grad():
        layer.running_mean.fill_(0.4)
        layer.running_var.fill_(3.0)
    layer.num_batches_tracked.fill_(3)
    layer.momentum = 0.0
    ref = ref_brn_train(x, layer.weight, layer.bias, layer.running_mean.clone(), layer.running_var.clone(), 4, 1.5, 2.5)
    torch.testing.assert_close(layer(x), ref.detach())
    with pytest.raises(NormConfigError, match=r"brn: rmax=2.0/dmax=None .*schedule=true"):
        build_norm("brn", 2, schedule=True, rmax=2.0)
    with pytest.raises(NormConfigError, match=r"brn: rmax_steps=100 must be > warmup_steps=5000"):
        build_norm("brn", 2, schedule=True, rmax_steps=100)


# ---------------------------------------------------------------- EvoNorm-B0


def ref_evonorm_b0(x, w, b, v, n, running_var=None, eps=1e-5, sides=False):
    """y; with ``sides`` also where the max takes its instance side (v x + sqrt(var_I + eps) > sqrt(var_B + eps))."""
    ys, right_side = [], []
    for c in gpu_chunks(x, n):
        if running_var is None:
            M = c.shape[0] * c.shape[2] * c.shape[3]
            mB = c.sum(dim=(0, 2, 3), keepdim=True) / M
            vB = ((c - mB) ** 2).sum(dim=(0, 2, 3), keepdim=True) / M
        else:
            vB = running_var.view(1, -1, 1, 1)
        HW = c.shape[2] * c.shape[3]
        mI = c.sum(dim=(2, 3), keepdim=True) / HW
        vI = ((c - mI) ** 2).sum(dim=(2, 3), keepdim=True) / HW
        left, right = torch.sqrt(vB + eps), v.view(1, -1, 1, 1) * c + torch.sqrt(vI + eps)
        ys.append(c / torch.maximum(left, right) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
        right_side.append((right > left).detach())
    return (from_gpu_chunks(ys), from_gpu_chunks(right_side)) if sides else from_gpu_chunks(ys)


@pytest.mark.parametrize("shape,n", [((4, 3, 6, 5), 2), ((6, 5, 3, 7), None), ((4, 3, 1, 1), 2)])
def test_evonorm_b0_vs_formula(shape, n, evonorm_path):
    C = shape[1]
    layer = set_affine(build_norm("evonorm_b0", C, per_gpu_batch=n, momentum=0.25).double())
    with torch.no_grad():
        layer.v.copy_(rand(C, seed=7))
    x = rand(*shape)
    y = layer(x)
    torch.testing.assert_close(y, ref_evonorm_b0(x, layer.weight, layer.bias, layer.v, n or shape[0]).detach())
    _, _, uvars = ref_bn_train(x, layer.weight.detach(), layer.bias.detach(), n or shape[0])
    torch.testing.assert_close(layer.running_var, (0.75 + 0.25 * uvars).mean(0))
    layer.eval()
    ye = layer(x)
    torch.testing.assert_close(
        ye, ref_evonorm_b0(x, layer.weight, layer.bias, layer.v, shape[0], running_var=layer.running_var).detach()
    )
    x1 = rand(1, C, 3, 3)
    assert torch.isfinite(layer(x1)).all()  # eval works at N=1
    evonorm_path.expect()


def test_evonorm_b0_gradcheck(evonorm_path):
    layer = set_affine(build_norm("evonorm_b0", 3, per_gpu_batch=2).double())
    x = rand(4, 3, 3, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    evonorm_path.expect()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape,n,channels_last",
    [((4, 3, 6, 5), 2, False), ((6, 5, 3, 7), None, False), ((4, 3, 6, 5), 2, True), ((4, 3, 1, 1), 2, False)],
)
def test_evonorm_b0_gradients_vs_formula(shape, n, channels_last, training, evonorm_path):
    """The hand-written backward: x, gamma, beta and v gradients against autograd of the float64 formula, with
    both sides of the max taken (v spread around 0, x offset), in training (paths through the per-GPU batch
    variance and the instance variance) and in evaluation (running variance: a constant)."""
    C = shape[1]
    layer = set_affine(build_norm("evonorm_b0", C, per_gpu_batch=n, momentum=0.0).double()).train(training)
    with torch.no_grad():
        layer.v.copy_(rand(C, seed=7))
        layer.running_var.copy_(rand(C, seed=5).abs() + 0.5)
    x = rand(*shape) * 2.0 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ps = leaf_copies(layer, ["weight", "bias", "v"])
    running = None if training else layer.running_var.clone()
    batch = (n or shape[0]) if training else shape[0]
    ref, right_side = ref_evonorm_b0(xr, ps["weight"], ps["bias"], ps["v"], batch, running, sides=True)
    assert right_side.any() and (~right_side).any()  # both sides of the max are taken
    y = layer(x)
    torch.testing.assert_close(y, ref)
    gy = rand(*shape, seed=12)
    y.backward(gy)
    ref.backward(gy)
    assert_grads_match(layer, x, xr, ps)
    evonorm_path.expect(nchw=x.is_contiguous())  # 1x1 channels_last is NCHW-contiguous too


def test_evonorm_b0_gradcheck_parameters(evonorm_path):
    """gradcheck (float64 finite differences) of x, gamma, beta and v together, training and evaluation."""
    layer = set_affine(build_norm("evonorm_b0", 3, per_gpu_batch=2, momentum=0.0).double())
    with torch.no_grad():
        layer.v.copy_(rand(3, seed=7))
    buffers = dict(layer.named_buffers())
    x = (rand(4, 3, 3, 2) * 2.0 + 0.5).requires_grad_()
    params = [layer.weight, layer.bias, layer.v]
    params = [p.detach().clone().requires_grad_() for p in params]

    def f(x, w, b, v):
        return torch.func.functional_call(layer, {"weight": w, "bias": b, "v": v, **buffers}, (x,))

    for training in (True, False):
        layer.train(training)
        assert torch.autograd.gradcheck(f, (x, *params)), training
    evonorm_path.expect()


@pytest.mark.parametrize(
    "shape,dims,channels_last",
    [
        ((2, 3, 4, 5, 6), (0, 3, 4), False),
        ((3, 4, 5, 6), (2, 3), False),
        ((3, 4, 5, 6), (0, 2, 3), False),
        ((3, 4, 5, 6), (1,), False),
        ((3, 4, 5, 6), (2, 3), True),
        ((3, 4, 5, 6), (0, 2, 3), True),
    ],
)
def test_var_mean_and_centered_scratch_match_torch(shape, dims, channels_last):
    """The fused layers' statistics helper (row-wise norms on merged trailing dims) vs torch.var_mean."""
    from normbench.norms._fused import var_mean

    x = rand(*shape) * 3 + 7
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    var, mean, centered = var_mean(x, dims, return_scratch=True)
    ref_var, ref_mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(centered, x - ref_mean, rtol=1e-12, atol=1e-12)
