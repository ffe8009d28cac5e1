"""Switchable Norm: float64 reference computing IN, LN and BN statistics directly (docs/papers.md section 3)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from normbench.norms import NormConfigError, build_norm, norm_layer, reestimate_batch_average, switchable_importance

from float64 import D, assert_grads_match, from_gpu_chunks, gpu_chunks, leaf_copies, rand

NEG = -1e4  # softmax weight exp(-1e4) == 0.0 exactly in float64


def biased(x, dims):
    m = x.mean(dims, keepdim=True)
    return m, ((x - m) ** 2).mean(dims, keepdim=True)


def ref_sn(x, lm, lv, w, b, n, use_bn=True, running=None, eps=1e-5):
    N, C, H, W = x.shape
    m_in, v_in = biased(x, (2, 3))
    m_ln, v_ln = biased(x, (1, 2, 3))
    if use_bn:
        if running is None:
            chunks = gpu_chunks(x, n)
            stats = [biased(c, (0, 2, 3)) for c in chunks]
            m_bn = from_gpu_chunks([s[0].expand(c.shape[0], C, 1, 1) for s, c in zip(stats, chunks)])
            v_bn = from_gpu_chunks([s[1].expand(c.shape[0], C, 1, 1) for s, c in zip(stats, chunks)])
        else:
            m_bn, v_bn = running[0].view(1, C, 1, 1), running[1].view(1, C, 1, 1)
        wm, wv = torch.softmax(lm, 0), torch.softmax(lv, 0)
        mean = wm[0] * m_in + wm[1] * m_ln + wm[2] * m_bn
        var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
    else:
        wm, wv = torch.softmax(lm[:2], 0), torch.softmax(lv[:2], 0)
        mean = wm[0] * m_in + wm[1] * m_ln
        var = wv[0] * v_in + wv[1] * v_ln
    return (x - mean) / torch.sqrt(var + eps) * w.view(1, C, 1, 1) + b.view(1, C, 1, 1)


def make_sn(C, seed=1, logits=None, **opts):
    layer = build_norm("sn", C, **opts).double()
    with torch.no_grad():
        layer.weight.copy_(1 + 0.5 * rand(C, seed=seed))
        layer.bias.copy_(rand(C, seed=seed + 1))
        if logits is None:
            layer.mean_weight.copy_(rand(3, seed=seed + 2))
            layer.var_weight.copy_(rand(3, seed=seed + 3))
        else:
            layer.mean_weight.copy_(torch.tensor(logits[0], dtype=D))
            layer.var_weight.copy_(torch.tensor(logits[1], dtype=D))
    return layer


def test_init_six_logits_equal_thirds():
    layer = build_norm("sn", 8)
    assert layer.mean_weight.shape == (3,) and layer.var_weight.shape == (3,)
    assert torch.equal(layer.mean_weight.detach(), torch.ones(3)) and torch.equal(
        layer.var_weight.detach(), torch.ones(3)
    )
    imp = layer.importance()
    assert imp["mean"] == pytest.approx({"in": 1 / 3, "ln": 1 / 3, "bn": 1 / 3})


@pytest.mark.parametrize(
    "shape,n,use_bn",
    [
        ((4, 3, 6, 5), 2, True),
        ((3, 6, 5, 7), None, True),
        ((6, 5, 3, 7), 3, True),
        ((1, 4, 5, 3), None, False),
        ((4, 6, 1, 1), 2, True),
        ((3, 6, 5, 7), 1, False),
        ((4, 6, 1, 1), None, False),
    ],
)
def test_sn_train_values_and_grads_vs_formula(shape, n, use_bn):
    C = shape[1]
    layer = make_sn(C, per_gpu_batch=n, use_bn=use_bn, momentum=0.3)
    x = rand(*shape).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    params = leaf_copies(layer, ("mean_weight", "var_weight", "weight", "bias"))
    y = layer(x)
    ref = ref_sn(xr, *params.values(), n or shape[0], use_bn=use_bn)
    torch.testing.assert_close(y, ref)
    assert torch.isfinite(y).all()
    gy = rand(*shape, seed=11)
    y.backward(gy)
    ref.backward(gy)
    assert_grads_match(layer, x, xr, params)


def test_sn_running_stats_and_eval():
    C, n = 5, 2
    layer = make_sn(C, per_gpu_batch=n, momentum=0.3)
    x = rand(6, C, 4, 3)
    layer(x)
    chunks = [biased(c, (0, 2, 3)) for c in gpu_chunks(x, n)]
    M = n * 4 * 3
    exp_mean = 0.7 * 0 + 0.3 * torch.stack([m.flatten() for m, _ in chunks]).mean(0)
    exp_var = 0.7 * 1 + 0.3 * torch.stack([v.flatten() * M / (M - 1) for _, v in chunks]).mean(0)
    torch.testing.assert_close(layer.running_mean, exp_mean)
    torch.testing.assert_close(layer.running_var, exp_var)
    layer.eval()
    xe = rand(3, C, 4, 3, seed=4)  # any batch size at eval
    ref = ref_sn(
        xe,
        layer.mean_weight,
        layer.var_weight,
        layer.weight,
        layer.bias,
        None,
        running=(layer.running_mean, layer.running_var),
    )
    torch.testing.assert_close(layer(xe), ref.detach())


@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_hot_importance_reduces_to_in_ln_bn(which):
    logits = [NEG] * 3
    logits[which] = 0.0
    C, n = 6, 3
    layer = make_sn(C, per_gpu_batch=n, logits=(logits, logits))
    x = rand(6, C, 5, 7)
    w, b = layer.weight.detach(), layer.bias.detach()
    if which == 0:
        ref = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    elif which == 1:
        ref = F.group_norm(x, 1, w, b, 1e-5)
    else:
        ref = from_gpu_chunks([F.batch_norm(c, None, None, w, b, True, 0.0, 1e-5) for c in gpu_chunks(x, n)])
    torch.testing.assert_close(layer(x), ref)
    layer.eval()
    if which == 2:
        ref = F.batch_norm(x, layer.running_mean, layer.running_var, w, b, False, 0.0, 1e-5)
    torch.testing.assert_close(layer(x), ref)


def test_use_bn_false_at_one_image_mixes_in_ln():
    x = rand(1, 4, 5, 3)
    layer = make_sn(4, use_bn=False, per_gpu_batch=1, logits=([0.0, NEG, 5.0], [0.0, NEG, 5.0]))
    torch.testing.assert_close(layer(x), F.instance_norm(x, weight=layer.weight, bias=layer.bias).detach())
    assert switchable_importance(nn.Sequential(layer))["0"]["mean"] == {"in": 1.0, "ln": 0.0, "bn": 0.0}
    with pytest.raises(NormConfigError, match=r"^sn: use_bn=true with per_gpu_batch=1 .*set use_bn=false"):
        build_norm("sn", 4, per_gpu_batch=1)
    with pytest.raises(NormConfigError, match="use_bn=false"):
        norm_layer("sn", per_gpu_batch=1)


def test_one_by_one_map_is_defined_or_clear_error():
    layer = make_sn(6, per_gpu_batch=2)
    y = layer(rand(4, 6, 1, 1))
    assert torch.isfinite(y).all()
    layer.eval()
    assert torch.isfinite(layer(rand(1, 6, 1, 1))).all()
    layer.train()
    with pytest.raises(NormConfigError, match=r"^sn: .*n=1 .*1x1 .*set use_bn=false"):
        make_sn(6)(rand(1, 6, 1, 1))
    assert torch.isfinite(make_sn(6, use_bn=False)(rand(1, 6, 1, 1))).all()


@pytest.mark.parametrize(
    "opts,train", [({"per_gpu_batch": 2}, True), ({}, True), ({"use_bn": False}, True), ({"per_gpu_batch": 2}, False)]
)
def test_sn_gradcheck(opts, train):
    layer = make_sn(3, **opts)
    layer.train(train)
    x = rand(4, 3, 3, 2).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))
    params = (layer.mean_weight, layer.var_weight, layer.weight, layer.bias)

    def f(lm, lv, w, b):
        return ref_sn(
            x.detach(),
            lm,
            lv,
            w,
            b,
            opts.get("per_gpu_batch", 4),
            use_bn=opts.get("use_bn", True),
            running=None if train else (layer.running_mean, layer.running_var),
        )

    inputs = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(f, inputs)  # the reference itself is smooth
    lm, lv, w, b = inputs
    y = layer(x.detach())
    grads = torch.autograd.grad(y.pow(2).sum(), params)
    ref_grads = torch.autograd.grad(f(lm, lv, w, b).pow(2).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_sn_channels_last():
    x = rand(4, 6, 5, 3)
    layer = make_sn(6, per_gpu_batch=2)
    yc = layer(x.contiguous(memory_format=torch.channels_last))
    assert yc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yc, layer(x))


def test_batch_average_reproduces_average_of_batch_statistics():
    C, n = 4, 2
    conv = nn.Conv2d(3, C, 3, padding=1).double()
    sn = make_sn(C, per_gpu_batch=n, inference="batch_average")
    sn_ma = make_sn(C, seed=7, per_gpu_batch=n)  # moving-average layer: must be left alone
    bn = nn.BatchNorm2d(C).double()
    model = nn.Sequential(conv, sn, bn, sn_ma).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [rand(4, 3, 5, 6, seed=s) for s in range(3)] + [(rand(6, 3, 5, 6, seed=9), torch.zeros(6))]
    reestimate_batch_average(model, batches)
    feats = [F.conv2d(b[0] if isinstance(b, tuple) else b, conv.weight, conv.bias, padding=1).detach() for b in batches]
    chunk_stats = [biased(c, (0, 2, 3)) for f in feats for c in gpu_chunks(f, n)]
    M = n * 5 * 6
    exp_mean = torch.stack([m.flatten() for m, _ in chunk_stats]).mean(0)
    exp_var = torch.stack([v.flatten() * M / (M - 1) for _, v in chunk_stats]).mean(0)
    torch.testing.assert_close(sn.running_mean, exp_mean)
    torch.testing.assert_close(sn.running_var, exp_var)
    after = model.state_dict()
    for k, v in before.items():
        if not k.startswith("1.running_"):
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)
    assert not any(m.training for m in model.modules())
    xe = rand(2, 3, 5, 6, seed=20)
    fe = F.conv2d(xe, conv.weight, conv.bias, padding=1)
    ref = ref_sn(fe, sn.mean_weight, sn.var_weight, sn.weight, sn.bias, None, running=(exp_mean, exp_var))
    torch.testing.assert_close(model[1](fe), ref.detach())
    # stale statistics after training are reported
    model.train()
    model(rand(4, 3, 5, 6))
    model.eval()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model(rand(2, 3, 5, 6))
    assert any("reestimate_batch_average" in str(r.message) for r in rec)


def test_batch_average_in_a_resnet_sets_every_sn_layer_from_the_batches():
    """In a torchvision ResNet-18: after reestimate_batch_average, the first SN layer's statistics are the average
    over GPUs and batches of each GPU's (mean, unbiased variance) of conv1's output, computed here from conv1
    directly; every other SN layer moved off its init; eval output of an image does not depend on its batch."""
    torch.manual_seed(0)
    n = 2
    model = torchvision.models.resnet18(
        norm_layer=norm_layer("sn", per_gpu_batch=n, inference="batch_average"), num_classes=3
    ).double()
    model(rand(4, 3, 32, 32, seed=1)).sum().backward()
    model.eval()
    batches = [rand(4, 3, 32, 32, seed=s) for s in (2, 3)]
    reestimate_batch_average(model, batches)
    assert not model.training
    with torch.no_grad():
        feats = [model.conv1(b) for b in batches]
    stats = [biased(c, (0, 2, 3)) for f in feats for c in gpu_chunks(f, n)]
    M = n * feats[0].shape[2] * feats[0].shape[3]
    torch.testing.assert_close(model.bn1.running_mean, torch.stack([m.flatten() for m, _ in stats]).mean(0))
    torch.testing.assert_close(
        model.bn1.running_var, torch.stack([v.flatten() * M / (M - 1) for _, v in stats]).mean(0)
    )
    for name, layer in model.named_modules():
        if hasattr(layer, "running_var"):
            assert (layer.running_var - 1).abs().max() > 1e-3, name  # re-estimated, not left at the init
    x = rand(3, 3, 32, 32, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_importance_dict():
    model = nn.Sequential(nn.Sequential(make_sn(4, seed=3)), make_sn(4, use_bn=False, seed=5), nn.ReLU())
    imp = switchable_importance(model)
    assert set(imp) == {"0.0", "1"}
    for _name, d in imp.items():
        for key in ("mean", "var"):
            assert set(d[key]) == {"in", "ln", "bn"}
            assert all(isinstance(v, float) for v in d[key].values())
            assert sum(d[key].values()) == pytest.approx(1.0)
    assert imp["1"]["mean"]["bn"] == 0.0 and imp["1"]["var"]["bn"] == 0.0
    ref = torch.softmax(model[0][0].mean_weight.detach(), 0)
    assert imp["0.0"]["mean"]["ln"] == pytest.approx(float(ref[1]))


@pytest.mark.parametrize("train", [True, False])
def test_float32_with_a_large_offset_keeps_the_variance(train):
    """Mean 1000x the std: LN/BN variances derived as mean(v + m^2) - m^2 in float32 would lose it entirely
    (errors ~0.2 on a unit output); the float64 formula is the reference."""
    C, n = 6, 2
    layer = make_sn(C, per_gpu_batch=n).float()
    x64 = rand(4, C, 7, 5, seed=3) + 1000.0
    if not train:
        layer(x64.float())  # running statistics from a float32 batch, then eval
        layer.eval()
    y = layer(x64.float())
    p64 = [p.detach().double() for p in (layer.mean_weight, layer.var_weight, layer.weight, layer.bias)]
    running = None if train else (layer.running_mean.double(), layer.running_var.double())
    ref = ref_sn(x64, *p64, n, running=running)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)
