"""``none``: no normalization (an ``nn.Identity`` that accepts the channel count).

``weight`` and ``bias`` are registered as None so torchvision's ``zero_init_residual`` check
(``m.bn2.weight is not None``) skips it instead of failing.
"""

from __future__ import annotations

from torch import nn

from ._common import NormLayer, check_channels

__all__ = ["NoNorm"]


class NoNorm(NormLayer, nn.Identity):
    norm_name = "none"

    def __init__(self, num_channels: int | None = None, device=None, dtype=None):
        super().__init__()
        self.num_channels = None if num_channels is None else check_channels(self.norm_name, num_channels)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return "" if self.num_channels is None else str(self.num_channels)
