"""Float64 helpers shared by the norm-layer tests (references are written in the tests themselves)."""
import torch

D = torch.float64


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D)


def set_affine(layer, seed=1):
    """Non-trivial gamma and beta, so a test would notice them being ignored."""
    C = layer.weight.numel()
    with torch.no_grad():
        layer.weight.copy_(1 + 0.5 * rand(C, seed=seed))
        layer.bias.copy_(rand(C, seed=seed + 1))
    return layer
