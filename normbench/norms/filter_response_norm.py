"""Filter Response Normalization + Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

    nu2 = mean_{H,W} x^2,   y = max(weight * x / sqrt(nu2 + eps) + bias, tau)

per sample and channel; ``tau`` is a learned per-channel threshold (init 0), no mean subtraction, same in
train and eval. ``eps`` = 1e-6 (the FRN paper's value). ``learnable_eps=True`` uses eps + |eps_l| with a
learnable scalar ``eps_l`` initialized to 1e-4 (the paper's variant for 1x1 / small maps). A 1x1 map is well
defined (y = max(weight * x / sqrt(x^2 + eps) + bias, tau)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import NormLayer, add_affine, check_bool, check_channels, check_eps, check_input
from ._fused import compiling, stats_affine

__all__ = ["FilterResponseNorm2d"]


def _frn_coeffs(nu2: Tensor, weight: Tensor, bias: Tensor, tau: Tensor, eps):
    """(A, B) of the TLU's argument shifted by tau: y - tau = x * A + B."""
    c = weight.numel()
    return weight.view(1, c, 1, 1) * torch.rsqrt(nu2 + eps), (bias - tau).view(1, c, 1, 1)


class FilterResponseNorm2d(NormLayer, nn.Module):
    """``frn``: FRN + TLU."""

    norm_name = "frn"

    @classmethod
    def _check(cls, eps, learnable_eps):
        check_eps(cls.norm_name, eps)
        check_bool(cls.norm_name, "learnable_eps", learnable_eps)

    def __init__(self, num_channels: int, eps: float = 1e-6, learnable_eps: bool = False, device=None, dtype=None):
        super().__init__()
        self._check(eps, learnable_eps)
        self.num_channels = self.num_features = check_channels(self.norm_name, num_channels)
        self.eps = float(eps)
        fk = {"device": device, "dtype": dtype}
        add_affine(self, num_channels, **fk)
        self.tau = nn.Parameter(torch.zeros(num_channels, **fk))
        if learnable_eps:
            self.eps_l = nn.Parameter(torch.full((1,), 1e-4, **fk))
        else:
            self.register_parameter("eps_l", None)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, learnable_eps={self.eps_l is not None}"

    def forward(self, x: Tensor) -> Tensor:
        check_input(self.norm_name, x, self.num_channels)
        C = self.num_channels
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if compiling():  # differentiable: the compiled graph derives the backward (see _fused.py)
            nu2 = xs.square().mean((2, 3), keepdim=True)
        else:
            with torch.no_grad():
                nu2 = torch.linalg.vector_norm(xs, 2, dim=(2, 3), keepdim=True).square_() / (x.shape[2] * x.shape[3])
        # nu2 = E[x^2] is the biased "variance" about mean 0: the fused op's backward (d var / dx = 2 (x - 0) / M)
        # is exact with mean = 0 held constant
        zero = torch.zeros_like(nu2)
        # TLU: max(y, tau) = relu(y - tau) + tau, with y - tau from the fused op. torch.maximum's backward
        # (tie splitting, a broadcast operand) was ~10 full-size passes, 80% of FRN's time on the CPU.
        if self.eps_l is None:
            eps = self.eps
            shifted = stats_affine(
                x, zero, nu2, lambda m, v, w, b, t: _frn_coeffs(v, w, b, t, eps), self.weight, self.bias, self.tau
            )
        else:
            base = self.eps
            shifted = stats_affine(
                x,
                zero,
                nu2,
                lambda m, v, w, b, t, e: _frn_coeffs(v, w, b, t, base + e.abs()),
                self.weight,
                self.bias,
                self.tau,
                self.eps_l,
            )
        return torch.relu_(shifted) + self.tau.view(1, C, 1, 1).to(shifted.dtype)
