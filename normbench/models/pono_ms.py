"""PONO with Moment Shortcut (Li et al. 2019) inside the ResNets' residual blocks (``model.pono_ms``).

The PONO paper places PONO early and re-injects its moments later (MS: ``y * std + mean``) around the layers in
between. In a residual block (ours, torchvision's, timm's: blocks with ``conv1`` and a last ``bn2``/``bn3``):

    conv1 -> PONO (moments kept) -> norm1 -> ReLU -> ... -> last conv -> MS (y * std + mean) -> last norm -> + x

* The moments are taken right after the first convolution: the earliest point inside the block, so MS spans
  every layer of the branch in between, as the paper spans the layers between encoder and decoder.
* They are re-injected right after the block's last convolution, BEFORE its last norm layer: that norm keeps its
  zero-initialized gamma (the papers' recipe), so the block still starts as the identity, and the raw moments,
  on the scale of conv1's output, cannot blow up the residual stream (the norm rescales the branch). The
  positional structure MS re-injects survives that norm: GN/BN normalize over whole feature maps, never per
  pixel.
* PONO here has no affine of its own (the block's norm layer after it has one), as in the PONO paper's models.
* Each block keeps its usual norm layer (``norm=pono_ms`` is GN; ``norm=bn +model.pono_ms=true`` puts PONO-MS
  around BN, and so on). A strided block (its spatial size halves between conv1 and the last conv) average-pools
  the moments to the last conv's output size.

The modules are wrappers around the block's own convolutions (``conv1`` becomes ``ConvPono``, the last conv
``ConvMomentShortcut``), so every block's own ``forward`` runs unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from normbench.norms import MomentShortcut, PositionalNorm

__all__ = ["ConvPono", "ConvMomentShortcut", "add_pono_ms", "residual_blocks"]


class ConvPono(nn.Module):
    """``pono(conv(x))``; the moments stay on ``self.pono`` for the block's :class:`ConvMomentShortcut`."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.pono = PositionalNorm(conv.out_channels, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pono(self.conv(x))


class ConvMomentShortcut(nn.Module):
    """``conv(x) * std + mean`` with the (N, 1, H, W) moments of the block's PONO, average-pooled to the
    convolution's output size when the block is strided."""

    def __init__(self, conv: nn.Conv2d, pono: PositionalNorm):
        super().__init__()
        self.conv = conv
        self.ms = MomentShortcut(pono)  # holds the PONO layer by reference, not as a submodule
        self.__dict__["_pono"] = pono

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        pono = self.__dict__["_pono"]
        mean, std = pono.last_mean, pono.last_std
        if mean is None:
            raise RuntimeError("pono_ms: the block's PONO has not run; the first conv must run before the last")
        if mean.shape[-2:] != y.shape[-2:]:
            mean, std = (F.adaptive_avg_pool2d(t, y.shape[-2:]) for t in (mean, std))
        return self.ms(y, mean, std)


def residual_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(block, name of its last conv) for every residual block: ``conv1`` plus ``bn3``/``conv3`` (Bottleneck)
    or ``bn2``/``conv2`` (BasicBlock), the names torchvision's, timm's and our ResNets use."""
    found = []
    for module in model.modules():
        if not isinstance(getattr(module, "conv1", None), nn.Conv2d):
            continue
        for norm, conv in (("bn3", "conv3"), ("bn2", "conv2")):
            if isinstance(getattr(module, norm, None), nn.Module) and isinstance(
                getattr(module, conv, None), nn.Conv2d
            ):
                found.append((module, conv))
                break
    return found


def add_pono_ms(model: nn.Module) -> nn.Module:
    """PONO after the first conv and MS after the last conv of every residual block (see the module docstring);
    a ValueError when the model has no such block."""
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(
            f"model.pono_ms=true: {type(model).__name__} has no residual block with conv1 and a last "
            f"bn2/bn3 to put PONO and the Moment Shortcut in; use a ResNet or model.pono_ms=false"
        )
    for block, last in blocks:
        first = ConvPono(block.conv1)
        block.conv1 = first
        setattr(block, last, ConvMomentShortcut(getattr(block, last), first.pono))
    return model
