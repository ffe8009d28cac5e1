"""Batch-independent layers (GN, LN, IN, EvoNorm-S0, FRN, PONO + Moment Shortcut, WS): float64 references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms import DynamicMomentShortcut, MomentShortcut, NormConfigError, WSConv2d, build_norm

from float64 import assert_grads_match, leaf_copies, rand, set_affine

SHAPES = [(2, 8, 5, 7), (3, 6, 5, 7), (1, 12, 4, 4), (2, 8, 1, 1)]


def ref_group(x, G, w, b, eps=1e-5):
    N, C, H, W = x.shape
    xg = x.reshape(N, G, -1)
    M = xg.shape[-1]
    mean = xg.sum(-1, keepdim=True) / M
    var = ((xg - mean) ** 2).sum(-1, keepdim=True) / M
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(N, C, H, W)
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "name,opts,G",
    [
        ("gn", {"groups": 2}, lambda C: 2),
        ("gn", {"channels_per_group": 2}, lambda C: C // 2),
        ("ln", {}, lambda C: 1),
        ("in", {}, lambda C: C),
    ],
)
def test_group_family_vs_formula_and_builtins(shape, name, opts, G):
    C = shape[1]
    layer = set_affine(build_norm(name, C, **opts).double())
    x = rand(*shape)
    if C // G(C) * shape[2] * shape[3] == 1:
        with pytest.raises(
            NormConfigError,
            match=rf"^{name}: a 1x1 map with 1 channel per group gives 1 value per "
            rf"group \(num_channels={C}, groups={C}\)",
        ):
            layer(x)
        return
    ref = ref_group(x, G(C), layer.weight, layer.bias).detach()
    for mode in (True, False):
        layer.train(mode)
        y = layer(x)
        torch.testing.assert_close(y, ref)
        assert torch.isfinite(y).all()
    torch.testing.assert_close(layer(x), F.group_norm(x, G(C), layer.weight, layer.bias, 1e-5), rtol=0, atol=0)
    if name == "in":
        torch.testing.assert_close(layer(x), F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=1e-5))


def test_gn_default_groups_and_ln_in_are_gn_ends():
    assert build_norm("gn", 64).num_groups == 32
    assert build_norm("ln", 48).num_groups == 1
    assert build_norm("in", 48).num_groups == 48
    assert build_norm("gn", 48, channels_per_group=16).num_groups == 3
    x = rand(2, 6, 4, 3)
    ln = build_norm("ln", 6).double()
    gn1 = nn.GroupNorm(1, 6).double()
    torch.testing.assert_close(ln(x), gn1(x))
    # NOT timm's LayerNorm2d (per-pixel over C)
    per_pixel = F.layer_norm(x.permute(0, 2, 3, 1), (6,)).permute(0, 3, 1, 2)
    assert not torch.allclose(ln(x), per_pixel)


def test_group_family_gradcheck_and_channels_last():
    x = rand(2, 4, 3, 2).requires_grad_()
    for name, opts in [
        ("gn", {"groups": 2}),
        ("ln", {}),
        ("in", {}),
        ("evonorm_s0", {"groups": 2}),
        ("frn", {}),
        ("pono", {}),
    ]:
        layer = set_affine(build_norm(name, 4, **opts).double())
        assert torch.autograd.gradcheck(layer, (x,)), name
        xc = x.detach().contiguous(memory_format=torch.channels_last)
        yc = layer(xc)
        torch.testing.assert_close(yc, layer(x.detach()))
        if name in ("gn", "ln", "in"):
            assert yc.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize(
    "name,opts,C,match",
    [
        (
            "gn",
            {"groups": 32},
            48,
            r"^gn: groups=32 does not divide num_channels=48; choose groups dividing 48 or set "
            r"channels_per_group$",
        ),
        ("gn", {"channels_per_group": 5}, 48, r"^gn: channels_per_group=5 does not divide num_channels=48"),
        ("gn", {"groups": 4, "channels_per_group": 4}, 16, r"^gn: both groups=4 and channels_per_group=4 are set"),
        ("gn", {"groups": 0}, 16, r"^gn: groups=0 must be >= 1$"),
        ("gn", {"groups": 2.0}, 16, r"^gn: groups=2.0 must be an integer"),
        ("evonorm_s0", {"groups": 32}, 48, r"^evonorm_s0: groups=32 does not divide num_channels=48"),
        ("pono", {}, 1, r"^pono: num_channels=1 .*>= 2$"),
        ("frn", {"eps": -1.0}, 4, r"^frn: eps=-1.0 must be > 0.0$"),
    ],
)
def test_bad_options(name, opts, C, match):
    with pytest.raises(NormConfigError, match=match) as e:
        build_norm(name, C, **opts)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- EvoNorm-S0, FRN


@pytest.mark.parametrize("shape", SHAPES)
def test_evonorm_s0_vs_formula(shape, evonorm_path):
    C = shape[1]
    layer = set_affine(build_norm("evonorm_s0", C, groups=2).double())
    with torch.no_grad():
        layer.v.copy_(rand(C, seed=4))
    x = rand(*shape)
    N, _, H, W = shape
    xg = x.reshape(N, 2, -1)
    var = ((xg - xg.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
    std = torch.sqrt(var + 1e-5).expand(N, 2, C // 2 * H * W).reshape(N, C, H, W)
    v = layer.v.view(1, -1, 1, 1)
    ref = x * torch.sigmoid(v * x) / std * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), ref.detach())
    evonorm_path.expect()


def ref_evonorm_s0(x, w, b, v, G, eps=1e-5):
    N, C, H, W = x.shape
    xg = x.reshape(N, G, -1)
    var = ((xg - xg.sum(-1, keepdim=True) / xg.shape[-1]) ** 2).sum(-1, keepdim=True) / xg.shape[-1]
    std = torch.sqrt(var + eps).expand(N, G, C // G * H * W).reshape(N, C, H, W)
    col = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    return x * torch.sigmoid(col(v) * x) / std * col(w) + col(b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_evonorm_s0_gradients_vs_formula(shape, channels_last, evonorm_path):
    """The hand-written backward: x, gamma, beta and v gradients against autograd of the float64 formula (an
    offset input, so the group mean's path matters), and a float64 gradcheck of all four together."""
    C = shape[1]
    layer = set_affine(build_norm("evonorm_s0", C, groups=2).double())
    with torch.no_grad():
        layer.v.copy_(rand(C, seed=4))
    x = rand(*shape) * 2.0 + 1.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ps = leaf_copies(layer, ["weight", "bias", "v"])
    ref = ref_evonorm_s0(xr, ps["weight"], ps["bias"], ps["v"], 2)
    y = layer(x)
    torch.testing.assert_close(y, ref)
    gy = rand(*shape, seed=12)
    y.backward(gy)
    ref.backward(gy)
    assert_grads_match(layer, x, xr, ps)
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias, layer.v)]

    def f(x, w, b, v):
        return torch.func.functional_call(layer, {"weight": w, "bias": b, "v": v}, (x,))

    assert torch.autograd.gradcheck(f, (x.detach().requires_grad_(), *params))
    evonorm_path.expect(nchw=x.is_contiguous())  # 1x1 channels_last is NCHW-contiguous too


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("learnable", [False, True])
def test_frn_vs_formula(shape, learnable):
    C = shape[1]
    layer = set_affine(build_norm("frn", C, learnable_eps=learnable).double())
    with torch.no_grad():
        layer.tau.copy_(0.3 * rand(C, seed=5))
    assert layer.eps == 1e-6
    x = rand(*shape).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    names = ["weight", "bias", "tau"] + (["eps_l"] if learnable else [])
    ps = leaf_copies(layer, names)
    nu2 = (xr * xr).sum((2, 3), keepdim=True) / (shape[2] * shape[3])
    eps = 1e-6 + (ps["eps_l"].abs() if learnable else 0.0)
    ref = torch.maximum(
        ps["weight"].view(1, -1, 1, 1) * xr / torch.sqrt(nu2 + eps) + ps["bias"].view(1, -1, 1, 1),
        ps["tau"].view(1, -1, 1, 1),
    )
    y = layer(x)
    torch.testing.assert_close(y, ref)
    assert torch.isfinite(y).all()
    gy = rand(*shape, seed=12)
    y.backward(gy)
    ref.backward(gy)
    assert_grads_match(layer, x, xr, ps)


# ---------------------------------------------------------------- PONO and Moment Shortcut


def ref_pono(x, eps=1e-5):
    C = x.shape[1]
    mean = x.sum(1, keepdim=True) / C
    std = torch.sqrt(((x - mean) ** 2).sum(1, keepdim=True) / (C - 1) + eps)  # unbiased over C
    return (x - mean) / std, mean, std


@pytest.mark.parametrize("shape", SHAPES + [(2, 2, 3, 3)])
def test_pono_vs_formula_and_moment_shortcut(shape):
    C = shape[1]
    layer = set_affine(build_norm("pono", C).double())
    x = rand(*shape)
    xhat, mean, std = ref_pono(x)
    y = layer(x)
    torch.testing.assert_close(y, (xhat * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)).detach())
    assert layer.last_mean.shape == (shape[0], 1, shape[2], shape[3])
    torch.testing.assert_close(layer.last_mean, mean)
    torch.testing.assert_close(layer.last_std, std)
    # return_moments and affine=False; MS re-injects the moments and reconstructs x exactly
    plain = build_norm("pono", C, affine=False, return_moments=True).double()
    yh, m, s = plain(x)
    torch.testing.assert_close(yh, xhat)
    torch.testing.assert_close(MomentShortcut()(yh, m, s), x)
    torch.testing.assert_close(MomentShortcut(plain)(yh), x)
    z = rand(shape[0], 3, shape[2], shape[3], seed=3)
    torch.testing.assert_close(MomentShortcut(plain)(z), z * std + mean)


def test_moment_shortcut_not_registered_and_dms():
    pono = build_norm("pono", 4, affine=False).double()
    net = nn.Sequential(pono, MomentShortcut(pono))
    assert len(list(net.parameters())) == 0 and len(list(net[1].children())) == 0
    with pytest.raises(NormConfigError, match="ms: no moments"):
        MomentShortcut()(rand(1, 4, 2, 2))
    dms = DynamicMomentShortcut(4, hidden_channels=8, pono=pono).double()
    x = rand(2, 4, 5, 3).requires_grad_()
    h = pono(x)
    out = dms(h)  # starts as identity: gamma 1, beta 0
    torch.testing.assert_close(out, h)
    with torch.no_grad():
        dms.net[2].weight.normal_(0, 0.1)
    assert torch.autograd.gradcheck(lambda t: dms(pono(t)), (x,))
    dms1 = DynamicMomentShortcut(4, per_channel=False, pono=pono).double()
    assert dms1(h).shape == h.shape


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_moment_shortcut_vs_formula(per_channel):
    """DMS (PONO paper, section 3): (beta, gamma) = net(cat(mean, std)) with net = conv k -> ReLU -> conv k (first
    half of the output beta, second half gamma; one channel each, broadcast, when not per_channel); y = x * gamma +
    beta. Non-trivial weights everywhere, so swapped halves, a dropped beta or a missing ReLU all fail."""
    C, hidden, k = 4, 5, 3
    pono = build_norm("pono", C, affine=False).double()
    dms = DynamicMomentShortcut(C, hidden_channels=hidden, kernel_size=k, per_channel=per_channel, pono=pono).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in dms.parameters():
            p.normal_(0, 0.5)
    x = rand(2, C, 5, 6, seed=11)
    h = pono(x)
    _, mean, std = ref_pono(x)
    c1, c2 = dms.net[0], dms.net[2]
    hid = F.relu(F.conv2d(torch.cat([mean, std], 1), c1.weight, c1.bias, padding=k // 2))
    out = F.conv2d(hid, c2.weight, c2.bias, padding=k // 2)
    out_channels = C if per_channel else 1
    assert out.shape[1] == 2 * out_channels
    beta, gamma = out[:, :out_channels], out[:, out_channels:]
    torch.testing.assert_close(dms(h), (h * gamma + beta).detach())
    torch.testing.assert_close(dms(h, mean, std), (h * gamma + beta).detach())  # explicit moments, same result


# ---------------------------------------------------------------- Weight Standardization


def test_wsconv_vs_formula_and_gradcheck():
    conv = WSConv2d(3, 5, 3, padding=1, bias=True).double()
    w = conv.weight.detach()
    # the WS paper's eqs. 5-6: biased variance as E[W^2] - mu^2, eps = 1e-5 inside the square root
    flat = w.reshape(5, -1)
    mean = flat.sum(1, keepdim=True) / flat.shape[1]
    sigma = torch.sqrt((flat * flat).sum(1, keepdim=True) / flat.shape[1] - mean * mean + 1e-5)
    w_hat = ((flat - mean) / sigma).reshape_as(w)
    x = rand(2, 3, 6, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, padding=1).detach())
    assert isinstance(conv, nn.Conv2d)
    small = WSConv2d(2, 3, 3, padding=1).double()
    xs = rand(1, 2, 4, 3).requires_grad_()
    assert torch.autograd.gradcheck(small, (xs,))
    assert torch.autograd.gradcheck(
        lambda wt: F.conv2d(
            xs.detach(), __import__("normbench.norms", fromlist=["standardize_weight"]).standardize_weight(wt)
        ),
        (small.weight.detach().clone().requires_grad_(),),
    )


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pono_gradients_through_output_and_moments_vs_formula(affine, channels_last):
    """PONO's custom backward: x, gamma and beta gradients, with upstream gradients on y AND on the moments
    (the Moment Shortcut back-propagates through them), against autograd of the float64 formula."""
    shape = (3, 5, 4, 6)
    layer = build_norm("pono", shape[1], affine=affine, return_moments=True).double()
    if affine:
        set_affine(layer)
    x = rand(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, mean, std = layer(x)
    xhat, m_ref, s_ref = ref_pono(xr)
    params = {}
    y_ref = xhat
    if affine:
        params = leaf_copies(layer, ("weight", "bias"))
        y_ref = xhat * params["weight"].view(1, -1, 1, 1) + params["bias"].view(1, -1, 1, 1)
    torch.testing.assert_close(y, y_ref)
    gy, gm, gs = rand(*shape, seed=21), rand(3, 1, 4, 6, seed=22), rand(3, 1, 4, 6, seed=23)
    ((y * gy).sum() + (mean * gm).sum() + (std * gs).sum()).backward()
    ((y_ref * gy).sum() + (m_ref * gm).sum() + (s_ref * gs).sum()).backward()
    assert_grads_match(layer, x, xr, params)
