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
    stem = conv3(3, 16) + norm(16)                                          # 432 + 32
    block = lambda cin, cout: conv3(cin, cout) + norm(cout) + conv3(cout, cout) + norm(cout)  # noqa: E731
    shortcut = lambda cin, cout: cin * cout + norm(cout)  # 1x1 projection conv + its norm  # noqa: E731
    stage1 = 3 * block(16, 16)                                              # 3 x 4672
    stage2 = block(16, 32) + shortcut(16, 32) + 2 * block(32, 32)           # 13952 + 576 + 2 x 18560
    stage3 = block(32, 64) + shortcut(32, 64) + 2 * block(64, 64)           # 55552 + 2176 + 2 x 73984
    fc = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + fc
    assert expected == 272_474  # = the 0.27M of He et al. (269,722 with option-A shortcuts) + 2,752 projection
    norm_channels = 16 + 6 * 16 + (6 * 32 + 32) + (6 * 64 + 64)  # 784 channels carry a norm

    for name in ("bn", "gn"):
        model = build_model(model_cfg("cifar_resnet20"), layer_for(name, groups=8), 10, 3)
        assert n_params(model) == expected, name
        assert sum(m.num_channels if hasattr(m, "num_channels") else m.num_features for m in norms_of(model)) \
            == norm_channels
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
    feats = model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(
        torch.randn(1, in_channels, size, size)))))))
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
    slots = [model.bn1] + [getattr(b, f"bn{i}") for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
                           for b in layer for i in (1, 2, 3)] + \
            [layer[0].downsample[1] for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
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
        assert torch.equal(b.bn3.weight, torch.zeros(b.bn3.num_channels if hasattr(b.bn3, "num_channels")
                                                      else b.bn3.num_features))
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
def ws_reference(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """float64 (w - mean) / sqrt(var + eps) over (Cin, kh, kw) per output filter, biased variance, eps inside
    the square root (normbench/norms/weight_std.py's convention, as timm's StdConv2d)."""
    w = weight.detach().double()
    flat = w.reshape(w.shape[0], -1)
    n = flat.shape[1]
    mean = flat.sum(1, keepdim=True) / n
    var = ((flat - mean) ** 2).sum(1, keepdim=True) / n
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


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
        ref = F.conv2d(x.double(), ws_reference(conv.weight), None, conv.stride, conv.padding, conv.dilation,
                       conv.groups)
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
