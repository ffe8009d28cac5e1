"""Models against independent references: hand-counted parameters, torchvision's ResNet-50 layout, the papers'
init recipe (docs/papers.md section 2), Weight Standardization re-derived in float64, timm and the real configs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from normbench.models import CifarBasicBlock, CifarResNet, build_model, init_weights
from normbench.norms import NORM_CLASSES, NORM_NAMES, GroupNorm, WSConv2d, is_norm_layer, norm_layer, norm_options

from conftest import CONFIG_DIR, compose


def model_cfg(config: str, **overrides):
    """The model node exactly as configs/model/CONFIG.yaml has it, plus overrides."""
    cfg = OmegaConf.load(CONFIG_DIR / "model" / f"{config}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def layer_for(name: str, groups: int = 32):
    """norm_layer(name) with the group count where the layer takes one (no per_gpu_batch: whole-batch stats)."""
    return norm_layer(name, **({"groups": groups} if "groups" in norm_options(name) else {}))


def norms_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_norm_layer(m)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- CIFAR ResNet (6n+2) --------------------------------------------------------------------------------------
def test_cifar_resnet20_parameter_count_by_hand():
    # ResNet-20: n = 3 BasicBlocks per stage, widths 16/32/64; 3x3 convs without bias; a 1x1 projection conv +
    # norm on the first block of stages 2 and 3 (shape changes); every norm has weight + bias (2C parameters).
    conv3 = lambda cin, cout: cin * cout * 9  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    stem = conv3(3, 16) + norm(16)  # 432 + 32
    block = lambda cin, cout: conv3(cin, cout) + norm(cout) + conv3(cout, cout) + norm(cout)  # noqa: E731
    shortcut = lambda cin, cout: cin * cout + norm(cout)  # 1x1 projection conv + its norm  # noqa: E731
    stage1 = 3 * block(16, 16)  # 3 x 4672
    stage2 = block(16, 32) + shortcut(16, 32) + 2 * block(32, 32)  # 13952 + 576 + 2 x 18560
    stage3 = block(32, 64) + shortcut(32, 64) + 2 * block(64, 64)  # 55552 + 2176 + 2 x 73984
    fc = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + fc
    assert expected == 272_474  # = the 0.27M of He et al. (269,722 with option-A shortcuts) + 2,752 projection
    norm_channels = 16 + 6 * 16 + (6 * 32 + 32) + (6 * 64 + 64)  # 784 channels carry a norm

    for name in ("bn", "gn"):
        model = build_model(model_cfg("cifar_resnet20"), layer_for(name, groups=8), 10, 3)
        assert n_params(model) == expected, name
        assert (
            sum(m.num_channels if hasattr(m, "num_channels") else m.num_features for m in norms_of(model))
            == norm_channels
        )
    no_norm = build_model(model_cfg("cifar_resnet20"), norm_layer("none"), 10, 3)
    assert n_params(no_norm) == expected - 2 * norm_channels
    # layout: 3 stages x 3 blocks, projections exactly where the shape changes
    blocks = [m for m in no_norm.modules() if isinstance(m, CifarBasicBlock)]
    assert len(blocks) == 9
    assert [b.downsample is not None for b in blocks] == [False] * 3 + [True, False, False] * 2
    assert all(c.bias is None for c in no_norm.modules() if isinstance(c, nn.Conv2d))


@pytest.mark.parametrize("depth,n_blocks", [(8, 3), (20, 9), (32, 15)])
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 28)])
def test_cifar_resnet_output_shape(depth, n_blocks, in_channels, size):
    model = build_model(model_cfg("cifar_resnet20", depth=depth), layer_for("bn"), 10, in_channels)
    assert sum(isinstance(m, CifarBasicBlock) for m in model.modules()) == n_blocks
    assert model.conv1.in_channels == in_channels
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # spatial: 32 -> 32 -> 16 -> 8 (28 -> 28 -> 14 -> 7) before the global pool
    feats = model.layer3(
        model.layer2(model.layer1(model.relu(model.bn1(model.conv1(torch.randn(1, in_channels, size, size))))))
    )
    assert feats.shape == (1, 64, math.ceil(size / 4), math.ceil(size / 4))


@pytest.mark.parametrize("depth", [21, 6, 2, 0, 23])
def test_cifar_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match=r"6n\+2"):
        CifarResNet(depth, layer_for("bn"))
    with pytest.raises(ValueError, match=r"6n\+2"):
        build_model(model_cfg("cifar_resnet20", depth=depth), layer_for("bn"), 10, 3)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="resnet50"):
        build_model(model_cfg("resnet50", name="vgg16"), layer_for("bn"), 10, 3)


# ---- ResNet-50 with every norm --------------------------------------------------------------------------------
R50_NORMS = 1 + 16 * 3 + 4  # stem + 16 Bottlenecks x 3 + 4 downsample shortcuts


@pytest.mark.parametrize("name", NORM_NAMES)
def test_resnet50_every_norm_is_ours(name):
    torch.manual_seed(0)
    model = build_model(model_cfg("resnet50"), layer_for(name), 10, 3)
    cls = NORM_CLASSES[name]
    ours = [m for m in model.modules() if type(m) is cls]
    assert len(ours) == R50_NORMS
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert all(type(m) is cls for m in norms_of(model))  # no other norm type anywhere
    # every norm slot of torchvision's layout holds ours: stem, bn1..bn3 of each block, downsample[1]
    slots = (
        [model.bn1]
        + [
            getattr(b, f"bn{i}")
            for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
            for b in layer
            for i in (1, 2, 3)
        ]
        + [layer[0].downsample[1] for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
    )
    assert len(slots) == R50_NORMS and all(type(s) is cls for s in slots)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for mode in (model.train, model.eval):
            mode()
            out = model(x)
            assert out.shape == (2, 10) and torch.isfinite(out).all(), (name, mode.__name__)


def test_resnet50_in_channels():
    model = build_model(model_cfg("resnet50"), layer_for("gn"), 5, 1)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 5)


# ---- the init recipe -------------------------------------------------------------------------------------------
def _check_conv_std(model: nn.Module, min_numel: int = 100_000) -> int:
    """He fan_out: std = sqrt(2 / (out_channels * kh * kw)); tolerance 6 standard errors of a sample std."""
    checked = 0
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d) and conv.weight.numel() >= min_numel:
            kh, kw = conv.kernel_size
            expected = math.sqrt(2.0 / (conv.out_channels * kh * kw))
            w = conv.weight.detach().double()
            rel_se = 1 / math.sqrt(2 * w.numel())
            assert abs(w.std().item() / expected - 1) < 6 * rel_se + 1e-3, conv
            assert abs(w.mean().item()) < 6 * expected / math.sqrt(w.numel()), conv
            checked += 1
    return checked


@pytest.mark.parametrize("name", ["bn", "gn"])
def test_resnet50_recipe_init(name):
    torch.manual_seed(0)
    model = build_model(model_cfg("resnet50"), layer_for(name), 1000, 3)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert len(blocks) == 16
    last = {id(b.bn3) for b in blocks}
    for b in blocks:
        assert torch.equal(
            b.bn3.weight, torch.zeros(b.bn3.num_channels if hasattr(b.bn3, "num_channels") else b.bn3.num_features)
        )
    others = [n for n in norms_of(model) if id(n) not in last]
    assert len(others) == R50_NORMS - 16
    shortcut = [layer[0].downsample[1] for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
    assert all(any(s is o for o in others) for s in shortcut)
    for n in norms_of(model):
        if id(n) not in last:
            assert torch.equal(n.weight, torch.ones_like(n.weight))
        assert torch.equal(n.bias, torch.zeros_like(n.bias))
    # fc ~ N(0, 0.01): 2048 x 1000 samples, sample std within 6 standard errors (0.3 %)
    w = model.fc.weight.detach().double()
    assert abs(w.std().item() / 0.01 - 1) < 6 / math.sqrt(2 * w.numel())
    assert abs(w.mean().item()) < 6 * 0.01 / math.sqrt(w.numel())
    assert torch.equal(model.fc.bias, torch.zeros(1000))
    # He fan_out (not fan_in): the 1x1 expansion conv 512->2048 has std sqrt(2/2048), fan_in would give 2x that
    conv3 = model.layer4[0].conv3
    assert abs(conv3.weight.std().item() / math.sqrt(2 / 2048) - 1) < 0.01
    assert _check_conv_std(model) >= 20


def test_cifar_recipe_init():
    torch.manual_seed(0)
    model = build_model(model_cfg("cifar_resnet20"), layer_for("bn"), 10, 3)
    blocks = [m for m in model.modules() if isinstance(m, CifarBasicBlock)]
    assert len(blocks) == 9  # ResNet-20: 3 stages x 3 blocks
    for b in blocks:
        assert torch.equal(b.bn2.weight, torch.zeros(b.bn2.weight.shape))
        assert torch.equal(b.bn1.weight, torch.ones(b.bn1.weight.shape))
        if b.downsample is not None:
            assert torch.equal(b.downsample[1].weight, torch.ones(b.downsample[1].weight.shape))
    assert torch.equal(model.bn1.weight, torch.ones(16))
    assert all(torch.equal(n.bias, torch.zeros_like(n.bias)) for n in norms_of(model))
    assert torch.equal(model.fc.bias, torch.zeros(10))
    # the largest convs (64x64x3x3 = 36,864 weights): He fan_out within statistical tolerance
    assert _check_conv_std(model, min_numel=30_000) == 5


@pytest.mark.parametrize("model_name", ["resnet50", "cifar_resnet20"])
def test_zero_init_last_gamma_false_keeps_ones(model_name):
    model = build_model(model_cfg(model_name, zero_init_last_gamma=False), layer_for("gn", groups=8), 10, 3)
    assert len(norms_of(model)) > 0
    for n in norms_of(model):
        assert torch.equal(n.weight, torch.ones_like(n.weight))


def test_init_weights_handles_bias_free_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.Linear(8, 4, bias=False), nn.Linear(4, 2))
    init_weights(model, zero_init_last_gamma=True)
    assert torch.equal(model[0].bias, torch.zeros(8)) and torch.equal(model[2].bias, torch.zeros(2))


# ---- Weight Standardization ------------------------------------------------------------------------------------
def ws_reference(weight: torch.Tensor, eps: float = 1e-5, unbiased: bool = False) -> torch.Tensor:
    """Weight Standardization as the WS paper defines it (Qiao et al. 2019, eqs. 5-6), in float64: per output
    filter i over its I = C_in/groups * kh * kw weights, mu = (1/I) sum W, sigma = sqrt((1/I) sum W^2 - mu^2 + eps),
    W_hat = (W - mu) / sigma. Convention: BIASED variance (1/I), eps = 1e-5 INSIDE the square root. unbiased=True
    gives the official code's variant instead ((W - mu) / (std with 1/(I-1) + eps)), to show the two differ."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    fan_in = w.shape[1]
    mu = w.sum(1, keepdim=True) / fan_in
    if unbiased:
        sigma = (((w - mu) ** 2).sum(1, keepdim=True) / (fan_in - 1)).sqrt() + eps
    else:
        sigma = ((w * w).sum(1, keepdim=True) / fan_in - mu * mu + eps).sqrt()
    return ((w - mu) / sigma).reshape(weight.shape)


@pytest.mark.parametrize("model_name", ["resnet50", "cifar_resnet8"])
def test_weight_standardization(model_name):
    torch.manual_seed(0)
    plain = build_model(model_cfg(model_name), layer_for("gn", groups=8), 10, 3)
    torch.manual_seed(0)
    model = build_model(model_cfg(model_name, weight_standardization=True), layer_for("gn", groups=8), 10, 3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(c) is WSConv2d for c in convs)
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert n_params(model) == n_params(plain)  # the raw weights are the parameters: nothing added or lost
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()]  # same state-dict keys (checkpoints interchange)
    for (_, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q)  # same raw init under the same seed
    torch.manual_seed(1)
    for conv in convs[:3] + convs[-3:]:
        x = torch.randn(2, conv.in_channels, 9, 9)
        ref = F.conv2d(
            x.double(), ws_reference(conv.weight), None, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        out = conv(x)
        assert out.shape == ref.shape
        # float32 module: accumulation error grows with the output scale (~sqrt(fan_in))
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=2e-6 * ref.abs().max().item())
        # the same module in float64 must match the independent formula to rounding
        torch.testing.assert_close(copy.deepcopy(conv).double()(x.double()), ref, rtol=1e-10, atol=1e-10)
    # the eps convention matters at He-init scale: a 1x1 conv with var ~ 2/fan_out is off by ~1e-3 without it
    small = min(convs, key=lambda c: c.weight.var().item())
    x = torch.randn(2, small.in_channels, 5, 5)
    no_eps = F.conv2d(x.double(), ws_reference(small.weight, eps=0.0), None, small.stride, small.padding)
    with_eps = F.conv2d(x.double(), ws_reference(small.weight), None, small.stride, small.padding)
    torch.testing.assert_close(copy.deepcopy(small).double()(x.double()), with_eps, rtol=1e-10, atol=1e-10)
    assert (no_eps - with_eps).abs().max() > 1e-4  # so the float64 match above does pin the eps convention
    # and the variance convention: the unbiased variant is off by ~1/(2 fan_in) of the output
    unbiased = F.conv2d(x.double(), ws_reference(small.weight, unbiased=True), None, small.stride, small.padding)
    assert (unbiased - with_eps).abs().max() > 1e-4
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()


# ---- timm --------------------------------------------------------------------------------------------------------
def test_timm_resnet18_with_gn():
    pytest.importorskip("timm")
    cfg = model_cfg("timm", timm_name="resnet18")
    model = build_model(cfg, norm_layer("gn", groups=32), 10, 3)
    norms = norms_of(model)
    assert len(norms) == 1 + 8 * 2 + 3  # stem + 8 BasicBlocks x 2 + 3 downsample shortcuts
    assert all(type(n) is GroupNorm and n.num_groups == 32 for n in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    from timm.models.resnet import BasicBlock as TimmBasicBlock

    last = [b.bn2 for b in model.modules() if isinstance(b, TimmBasicBlock)]  # timm's own BasicBlock ends with bn2
    assert len(last) == 8 and all(torch.equal(n.weight, torch.zeros_like(n.weight)) for n in last)
    with torch.no_grad():
        out = model.train()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_timm_bad_names():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="Unknown model"):
        build_model(model_cfg("timm", timm_name="no_such_model_xyz"), layer_for("gn"), 10, 3)
    with pytest.raises(ValueError, match="timm_name"):
        build_model(model_cfg("timm", timm_name=None), layer_for("gn"), 10, 3)


# ---- the real configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,ws", [("gn", False), ("gn_ws", True)])
def test_composed_config_builds(norm, ws):
    cfg = compose(["model=resnet50", f"norm={norm}"])
    assert cfg.norm.name == "gn" and cfg.norm.groups == 32 and cfg.model.weight_standardization is ws
    model = build_model(cfg.model, norm_layer(cfg.norm.name, groups=cfg.norm.groups), 10, 3)
    gns = [m for m in model.modules() if type(m) is GroupNorm]
    assert len(gns) == R50_NORMS and all(g.num_groups == 32 for g in gns)
    assert all((type(c) is WSConv2d) is ws for c in model.modules() if isinstance(c, nn.Conv2d))
    assert sum(torch.equal(g.weight, torch.zeros_like(g.weight)) for g in gns) == 16
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# ---- PONO + Moment Shortcut in the residual blocks (model.pono_ms) --------------------------------------------
def pono_ms_model(model_name: str, norm: str = "gn", groups: int = 4, **overrides):
    """The model with PONO-MS, every gamma 1 (a zero last gamma would hide the branch from the output)."""
    torch.manual_seed(0)
    cfg = model_cfg(model_name, zero_init_last_gamma=False, pono_ms=True, **overrides)
    return build_model(cfg, layer_for(norm, groups=groups), 10, 3)


def test_pono_ms_block_is_pono_then_moments_reinjected_after_the_last_conv():
    """A float64 CIFAR block against the placement written out by hand with torch built-ins."""
    from normbench.models.pono_ms import ConvMomentShortcut, ConvPono

    model = pono_ms_model("cifar_resnet8", groups=2, width=4).double()
    block = model.layer2[0]  # strided on conv1: conv1's and conv2's outputs share one size
    assert isinstance(block.conv1, ConvPono) and isinstance(block.conv2, ConvMomentShortcut)
    with torch.no_grad():
        for norm in (block.bn1, block.bn2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    h = F.conv2d(x, block.conv1.conv.weight, stride=2, padding=1)
    mean, std = h.mean(1, keepdim=True), torch.sqrt(h.var(1, keepdim=True) + 1e-5)  # PONO: unbiased over C
    h = F.relu(F.group_norm((h - mean) / std, 2, block.bn1.weight, block.bn1.bias, 1e-5))
    h = F.conv2d(h, block.conv2.conv.weight, padding=1) * std + mean
    h = F.group_norm(h, 2, block.bn2.weight, block.bn2.bias, 1e-5)
    identity = block.downsample(x)
    torch.testing.assert_close(block(x), F.relu(h + identity))


def test_moment_shortcut_pools_the_moments_of_a_strided_bottleneck():
    from normbench.models.pono_ms import ConvMomentShortcut, ConvPono

    first = ConvPono(nn.Conv2d(3, 6, 1, bias=False)).double()
    last = ConvMomentShortcut(nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False).double(), first.pono)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    h = first(x)
    c = F.conv2d(x, first.conv.weight)
    mean, std = c.mean(1, keepdim=True), torch.sqrt(c.var(1, keepdim=True) + 1e-5)
    expected = F.conv2d(h, last.conv.weight, stride=2, padding=1) * F.avg_pool2d(std, 2) + F.avg_pool2d(mean, 2)
    torch.testing.assert_close(last(h), expected)


@pytest.mark.parametrize("model_name", ["cifar_resnet8", "resnet50"])
def test_removing_the_moment_shortcut_changes_the_output_and_gradients_reach_both_paths(model_name):
    size = 32 if model_name == "resnet50" else 16
    model = pono_ms_model(model_name, groups=4 if model_name == "cifar_resnet8" else 32)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    blocks = [m for m in model.modules() if hasattr(m, "conv1") and hasattr(m.conv1, "pono")]
    assert blocks and len(blocks) == (16 if model_name == "resnet50" else 3)
    block = blocks[-1]
    last = "conv3" if hasattr(block, "conv3") else "conv2"
    moments = [block.conv1.pono.last_mean, block.conv1.pono.last_std]
    for t in moments:
        t.retain_grad()
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in moments)  # the moments' path
    for conv in (block.conv1.conv, getattr(block, last).conv):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0  # the block's conv weights
    # the moments' path carries gradient into conv1 of its own: detaching it changes conv1's gradient
    grad_with_ms = block.conv1.conv.weight.grad.clone()
    model.zero_grad()
    ms = getattr(block, last)
    real_forward = ms.forward
    ms.forward = lambda h: ms.conv(h) * ms._pono.last_std.detach() + ms._pono.last_mean.detach()
    model(x).square().sum().backward()
    assert not torch.allclose(block.conv1.conv.weight.grad, grad_with_ms)
    ms.forward = real_forward
    # removing MS (the last conv alone) changes the output
    with torch.no_grad():
        setattr(block, last, ms.conv)
        assert not torch.allclose(model(x), out)


@pytest.mark.parametrize("model_name, size", [("cifar_resnet8", 16), ("cifar_resnet20", 16), ("resnet50", 32)])
@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_pono_ms_trains_in_every_resnet(model_name, size, norm):
    model = pono_ms_model(model_name, norm=norm, groups=4 if model_name != "resnet50" else 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def test_pono_ms_config_and_a_model_without_blocks():
    cfg = compose(["model=resnet50", "norm=pono_ms"])
    assert cfg.norm.name == "gn" and cfg.model.pono_ms is True
    assert compose(["norm=bn", "+model.pono_ms=true"]).model.pono_ms is True
    with pytest.raises(ValueError, match="pono_ms"):
        from normbench.models import add_pono_ms

        add_pono_ms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
