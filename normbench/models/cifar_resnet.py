"""CIFAR-style ResNets (He et al. 2016, section 4.2): three stages of 6n+2 layers, for 32x32 and 28x28 inputs.

Shortcuts that change shape use a 1x1 convolution followed by the norm layer (option B), so the norm layer
under study sits on every path, as in the ImageNet ResNets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]  # norm_layer(num_channels) -> the block's norm layer


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_layer: NormFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(out_channels)  # the block's last norm (zero_init_last)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm_layer(out_channels)
            )

    def zero_init_last(self) -> None:
        """gamma = 0 in the block's last norm layer (the papers' recipe; timm's blocks have the same method)."""
        if isinstance(getattr(self.bn2, "weight", None), nn.Parameter):
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(
        self, depth: int, norm_layer: NormFactory, num_classes: int = 10, in_channels: int = 3, width: int = 16
    ):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"cifar_resnet: depth={depth} is not 6n+2 (n>=1); use 8, 20, 32, 44, 56 or 110")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(channels, out_channels, stride, norm_layer))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
