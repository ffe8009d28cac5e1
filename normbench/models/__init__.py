"""Models built by name, every norm layer coming from one `norm_layer(num_channels)` callable.

`build_model` applies the papers' recipe (docs/papers.md section 2) to every model: He (fan_out) init for
convolutions, fc ~ N(0, 0.01), gamma = 1 everywhere except the last norm layer of each residual block
(gamma = 0 when `zero_init_last_gamma`), optionally PONO + Moment Shortcut in every residual block
(`pono_ms`, normbench/models/pono_ms.py) and Weight Standardization on every convolution.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normbench.models.cifar_resnet import BasicBlock as CifarBasicBlock
from normbench.models.cifar_resnet import CifarResNet
from normbench.models.pono_ms import add_pono_ms
from normbench.norms import convert_to_ws, is_norm_layer

MODEL_NAMES = ("resnet50", "resnet18", "cifar_resnet", "timm")


def _torchvision_resnet(name: str, norm_layer, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    # torchvision's resnet50 is v1.5 (stride on the 3x3 conv), the recipe's model.
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, norm_layer=norm_layer)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def _timm_model(timm_name: str, norm_layer, num_classes: int, in_channels: int) -> nn.Module:
    import timm

    if not timm_name:
        raise ValueError("model=timm needs model.timm_name, e.g. model.timm_name=resnet26d")
    try:
        return timm.create_model(
            timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, norm_layer=norm_layer
        )
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"model=timm: {err}; list names with timm.list_models()") from None


def zero_init_last_norms(model: nn.Module) -> int:
    """Zero the gamma of every residual block's last norm layer; returns how many blocks did. Blocks that know
    their last norm say so themselves (timm's and ours: ``zero_init_last()``); torchvision's Bottleneck and
    BasicBlock end with bn3 and bn2."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = 0
    for module in model.modules():
        if callable(getattr(module, "zero_init_last", None)):
            module.zero_init_last()
        elif isinstance(module, (Bottleneck, BasicBlock)):
            last = module.bn3 if isinstance(module, Bottleneck) else module.bn2
            if isinstance(getattr(last, "weight", None), nn.Parameter):
                nn.init.zeros_(last.weight)
        else:
            continue
        blocks += 1
    return blocks


def init_weights(model: nn.Module, zero_init_last_gamma: bool) -> None:

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:  # timm heads / projections may be bias-free
                nn.init.zeros_(module.bias)
        elif is_norm_layer(module) and isinstance(getattr(module, "weight", None), nn.Parameter):
            nn.init.ones_(module.weight)
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                nn.init.zeros_(module.bias)
    if zero_init_last_gamma:
        zero_init_last_norms(model)


def build_model(cfg, norm_layer: Callable[[int], nn.Module], num_classes: int, in_channels: int) -> nn.Module:
    """`cfg` is the `model` config node (a dict or a DictConfig): name, and depth/width (cifar_resnet) or
    timm_name (timm)."""
    name = cfg["name"]
    if name in ("resnet50", "resnet18"):
        model = _torchvision_resnet(name, norm_layer, num_classes, in_channels)
    elif name == "cifar_resnet":
        model = CifarResNet(cfg["depth"], norm_layer, num_classes, in_channels, width=cfg["width"])
    elif name == "timm":
        model = _timm_model(cfg["timm_name"], norm_layer, num_classes, in_channels)
    else:
        raise ValueError(f"unknown model.name={name!r}; choose one of {', '.join(MODEL_NAMES)}")
    init_weights(model, cfg["zero_init_last_gamma"])
    if cfg.get("pono_ms", False):  # the key exists only where configs/norm/pono_ms.yaml (or +model.pono_ms) sets it
        add_pono_ms(model)
    if cfg["weight_standardization"]:
        convert_to_ws(model)
    return model


__all__ = ["build_model", "CifarResNet", "CifarBasicBlock", "MODEL_NAMES", "zero_init_last_norms", "add_pono_ms"]
