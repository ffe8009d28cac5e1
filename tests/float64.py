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


def gpu_chunks(x, n):
    """The emulated GPUs of n images each, as normbench assigns them: GPU j holds images j, j+k, j+2k, ...
    (k = N // n; n=None: one GPU holds the whole batch)."""
    k = 1 if n is None else x.shape[0] // n
    return [x[j::k] for j in range(k)]


def from_gpu_chunks(chunks):
    """Inverse of gpu_chunks (differentiable): per-GPU tensors back in batch order."""
    return torch.stack(chunks, 1).flatten(0, 1)


def leaf_copies(layer, names):
    """Detached leaf copies of the layer's parameters, for the reference formula's own autograd."""
    return {k: getattr(layer, k).detach().clone().requires_grad_() for k in names}


def assert_grads_match(layer, x, x_ref, params):
    """After backward through the layer and through the reference: input and parameter gradients agree."""
    torch.testing.assert_close(x.grad, x_ref.grad)
    for k, p in params.items():
        torch.testing.assert_close(getattr(layer, k).grad, p.grad, msg=k)
