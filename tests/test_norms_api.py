"""Public API of normbench.norms: factory, option validation, norm_layer callables, helpers, model integration."""

import pickle

import pytest
import torch
import torchvision
from torch import nn

from normbench.norms import (
    NORM_NAMES,
    MomentShortcut,
    NormConfigError,
    WSConv2d,
    build_norm,
    is_norm_layer,
    norm_layer,
    norm_options,
    reads_running_stats_in_training,
    switchable_importance,
)

EXPECTED_NAMES = {"bn", "syncbn", "gn", "ln", "in", "sn", "pono", "brn", "frn", "evonorm_b0", "evonorm_s0", "none"}


def opts_for(name, n=2):
    return {"per_gpu_batch": n} if "per_gpu_batch" in norm_options(name) else {}


def test_names_and_options():
    assert set(NORM_NAMES) == EXPECTED_NAMES and isinstance(NORM_NAMES, tuple)
    assert norm_options("bn") == frozenset({"per_gpu_batch", "momentum", "eps"})
    assert norm_options("syncbn") == frozenset({"momentum", "eps"})
    assert norm_options("gn") == frozenset({"groups", "channels_per_group", "eps"})
    assert {"per_gpu_batch", "use_bn", "inference", "momentum", "eps"} <= norm_options("sn")
    assert {
        "rmax",
        "dmax",
        "schedule",
        "warmup_steps",
        "rmax_max",
        "rmax_steps",
        "dmax_max",
        "dmax_steps",
        "per_gpu_batch",
        "momentum",
        "eps",
    } <= norm_options("brn")
    assert {"affine", "eps", "return_moments"} <= norm_options("pono")
    assert norm_options("none") == frozenset()
    for name in NORM_NAMES:
        assert isinstance(norm_options(name), frozenset)
    assert {n for n in NORM_NAMES if "per_gpu_batch" in norm_options(n)} == {"bn", "sn", "brn", "evonorm_b0"}


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: build_norm("batchnorm", 8), r"^unknown norm 'batchnorm'; choose one of bn, syncbn"),
        (lambda: norm_options("xx"), r"^unknown norm 'xx'"),
        (
            lambda: build_norm("gn", 8, momentum=0.1),
            r"^gn: unknown option 'momentum'; gn accepts channels_per_group, eps, "
            r"groups$",
        ),
        (lambda: norm_layer("gn", groups=3, channels_per_group=2), r"^gn: both groups=3 and channels_per_group=2"),
        (lambda: norm_layer("bn", per_gpu_batch=0), r"^bn: per_gpu_batch=0 must be >= 1$"),
        (lambda: norm_layer("bn", per_gpu_batch=2.5), r"^bn: per_gpu_batch=2.5 must be an integer or None$"),
        (lambda: norm_layer("bn", momentum=1.5), r"^bn: momentum=1.5 must be <= 1.0$"),
        (lambda: norm_layer("sn", inference="median"), r"^sn: inference='median' is not one of"),
        (lambda: norm_layer("sn", use_bn=1), r"^sn: use_bn=1 must be true or false$"),
        (lambda: norm_layer("none", eps=1e-5), r"^none: unknown option 'eps'; none accepts no options$"),
        (
            lambda: norm_layer("gn", groups=32)(48),
            r"^gn: groups=32 does not divide num_channels=48; choose groups "
            r"dividing 48 or set channels_per_group$",
        ),
        (lambda: build_norm("gn", 0), r"^gn: num_channels=0 must be >= 1$"),
        (
            lambda: build_norm("bn", 4)(torch.randn(2, 3, 4, 4)),
            r"^bn: input has 3 channels but the layer was built for "
            r"num_channels=4$",
        ),
    ],
)
def test_bad_input_one_line_errors(call, match):
    with pytest.raises(NormConfigError, match=match) as e:
        call()
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_norm_layer_callable_tolerates_timm_kwargs():
    f = norm_layer("gn", groups=4)
    layer = f(16, eps=1e-6, affine=True, device="cpu", dtype=torch.float64)
    assert layer.eps == 1e-6 and layer.weight.dtype == torch.float64 and layer.num_groups == 4
    assert f(num_features=8).num_channels == 8
    with pytest.raises(NormConfigError, match=r"^gn: affine=False is not supported"):
        f(16, affine=False)
    with pytest.raises(NormConfigError, match=r"^gn: unexpected argument 'inplace' for num_channels=16"):
        f(16, inplace=True)
    assert norm_layer("pono")(8, affine=False).weight is None
    assert isinstance(norm_layer("none")(8, eps=1e-3), nn.Identity)
    assert norm_layer("frn")(8).eps == 1e-6 and norm_layer("frn")(8, eps=1e-5).eps == 1e-5
    bn = norm_layer("bn", per_gpu_batch=4)(8, momentum=0.01)
    assert bn.momentum == 0.01 and bn.per_gpu_batch == 4
    copy = pickle.loads(pickle.dumps(f))  # a plain functools.partial: picklable, timm re-binds its keywords
    assert (copy.func, copy.keywords) == (f.func, f.keywords) and "groups=4" in repr(f)
    assert norm_layer("evonorm_b0", per_gpu_batch=2)(8, dtype=torch.float64).running_var.dtype == torch.float64
    assert norm_layer("brn")(8, device="cpu").num_batches_tracked.dtype == torch.long


def test_is_norm_layer_and_batch_stats_flag():
    for name in NORM_NAMES:
        assert is_norm_layer(build_norm(name, 64, **opts_for(name))), name
    for m in (
        nn.BatchNorm1d(3),
        nn.BatchNorm2d(3),
        nn.BatchNorm3d(3),
        nn.SyncBatchNorm(3),
        nn.GroupNorm(1, 3),
        nn.LayerNorm(3),
        nn.InstanceNorm2d(3),
        nn.InstanceNorm1d(3, affine=True),
        nn.LocalResponseNorm(2),
    ):
        assert is_norm_layer(m), type(m).__name__
    for m in (nn.Conv2d(3, 3, 1), nn.Linear(3, 3), WSConv2d(3, 3, 1), nn.ReLU(), MomentShortcut()):
        assert not is_norm_layer(m), type(m).__name__
    assert reads_running_stats_in_training(nn.Sequential(nn.Conv2d(3, 8, 1), build_norm("brn", 8)))
    for name in NORM_NAMES:
        if name != "brn":
            assert not reads_running_stats_in_training(nn.Sequential(build_norm(name, 64, **opts_for(name)))), name


def test_weight_bias_are_per_channel_parameters():
    for name in NORM_NAMES:
        layer = build_norm(name, 64, **opts_for(name))
        if name == "none":
            assert layer.weight is None and layer.bias is None
            continue
        for p in (layer.weight, layer.bias):
            assert isinstance(p, nn.Parameter) and p.shape == (64,), name
        # weight 0 and a non-zero bias: the output is the bias, channel by channel (a dropped or misaligned
        # bias fails; with the zero bias of a fresh layer it would not)
        nn.init.zeros_(layer.weight)
        with torch.no_grad():
            layer.bias.copy_(torch.linspace(-2.0, 2.0, 64))
        layer.train()
        y = layer(torch.randn(4, 64, 3, 3))
        expected = layer.bias.detach().view(1, 64, 1, 1).expand_as(y)
        if name == "frn":  # FRN's TLU: max(bias, tau), tau 0 at init
            expected = expected.clamp(min=0.0)
        torch.testing.assert_close(y, expected, msg=name)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_torchvision_resnet18(name):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(
        norm_layer=norm_layer(name, **opts_for(name)), zero_init_residual=True, num_classes=5
    )
    if name != "none":
        assert float(model.layer1[0].bn2.weight.detach().abs().sum()) == 0.0
        assert float(model.layer1[0].bn1.weight.detach().abs().sum()) > 0.0
    x = torch.randn(4, 3, 64, 64 if name != "in" else 40)  # odd last maps; IN needs > 1 value per map
    y = model(x)
    assert y.shape == (4, 5) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if name == "sn":
        imp = switchable_importance(model)
        assert "bn1" in imp and "layer4.1.bn2" in imp
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:1])).all()


def test_timm_model_accepts_norm_layer():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, norm_layer=norm_layer("gn", groups=8))
    assert isinstance(model.bn1, nn.GroupNorm) and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_options_and_their_defaults_come_from_each_layers_init():
    """norm_layer gives a plain functools.partial (what timm's get_norm_layer unbinds and re-binds), and a
    layer's accepted options are its __init__ parameters besides num_channels / device / dtype."""
    import functools
    import inspect

    from timm.layers import get_norm_layer

    f = norm_layer("sn", use_bn=False)
    assert type(f) is functools.partial and f.keywords == {"norm_name": "sn", "use_bn": False}
    rebound = get_norm_layer(f)
    assert rebound.keywords == f.keywords and rebound(8).use_bn is False
    from normbench.norms import NORM_CLASSES

    for name, cls in NORM_CLASSES.items():
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "num_channels", "device", "dtype"}
        assert norm_options(name) == params, name
    with pytest.raises(NormConfigError, match=r"^sn: unknown option 'groups'; sn accepts eps, inference, momentum"):
        NORM_CLASSES["sn"].check_options(groups=2)
