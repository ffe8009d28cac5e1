"""The compiled path: every layer of the factory traces into ONE graph under torch.compile, and the compiled
layer is exact.

- One graph: ``fullgraph=True`` raises on any graph break, in the forward and in AOTAutograd's trace of the
  backward (backend ``aot_eager``: the same capture as inductor, no code generation, so all 80 settings --
  train/eval x NCHW/channels_last x fp32/bf16 autocast, inside conv -> norm -> ReLU -- run in seconds).
  The same settings check eager-versus-compiled parity of outputs, gradients and running statistics.
- Exact: with inductor (the CPU's real code generator) in float64, output, input gradient, every parameter's
  gradient and the running statistics against float64 formulas written from the equations (the same
  references as the eager tests), in training and in evaluation. This caught a silent PyTorch bug: inductor
  recomputed Batch Renorm's r and d in the backward from the buffers after their in-place update.
"""

from __future__ import annotations

import copy
import itertools
import shutil

import pytest
import torch
from torch import nn

from normbench.norms import NORM_NAMES, build_norm

from float64 import rand, set_affine
from test_norms_batch import ref_bn_train, ref_brn_train, ref_evonorm_b0
from test_norms_sample import ref_group, ref_pono
from test_norms_switchable import ref_sn

COMPILED = [n for n in NORM_NAMES if n != "syncbn"]  # syncbn is native BN, converted to SyncBatchNorm under DDP
OPTIONS = {
    "bn": {"per_gpu_batch": 2},
    "sn": {"per_gpu_batch": 2},
    "brn": {"per_gpu_batch": 2},
    "evonorm_b0": {"per_gpu_batch": 2},
    "gn": {"groups": 2},
    "evonorm_s0": {"groups": 2},
}
MOMENTUM = 0.3
needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on the CPU needs a C++ compiler"
)


ON_CPU_AND_CUDA = pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=needs_cxx), pytest.param("cuda", marks=pytest.mark.gpu)]
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- one graph, and parity with eager, for every setting ---------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", COMPILED)
def test_every_layer_traces_into_one_graph_and_matches_eager(name, device):
    failures = []
    for training, channels_last, bf16 in itertools.product([True, False], [False, True], [False, True]):
        torch._dynamo.reset()
        torch.manual_seed(0)
        # no conv bias: per-channel norms make its gradient zero up to rounding, which no relative check can judge
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), build_norm(name, 8, **OPTIONS.get(name, {})), nn.ReLU()
        )
        with torch.no_grad():
            for p in model[1].parameters():
                p.add_(torch.randn_like(p) * 0.3)
        model = model.to(device).train(training)
        x = torch.randn(8, 3, 6, 6, device=device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        eager = copy.deepcopy(model)

        def step(m, x, bf16=bf16):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                return m(x)

        setting = f"{name} {'train' if training else 'eval'} {'channels_last' if channels_last else 'NCHW'} " + (
            "bf16" if bf16 else "fp32"
        )
        # fullgraph=True: a graph break anywhere (forward or the traced backward) raises here
        y = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)(model, x)
        upstream = torch.randn(y.shape, device=device)
        (y.float() * upstream).sum().backward()
        y_eager = step(eager, x)
        (y_eager.float() * upstream).sum().backward()
        if channels_last and y.is_contiguous(memory_format=torch.channels_last) != y_eager.is_contiguous(
            memory_format=torch.channels_last
        ):
            failures.append(f"{setting}: layout differs from eager")
        tolerance = 1e-2 if bf16 else 1e-5  # relative, norm-wise: bf16 rounds each value by up to 0.4%
        pairs = [("output", y.float(), y_eager.float())]
        pairs += [(f"grad {k}", p.grad, q.grad) for (k, p), q in zip(model.named_parameters(), eager.parameters())]
        pairs += [(f"buffer {k}", p.float(), q.float()) for (k, p), q in zip(model.named_buffers(), eager.buffers())]
        for what, a, b in pairs:
            scale = b.float().norm().item() or 1.0
            if (a.float() - b.float()).norm().item() > tolerance * scale:
                failures.append(f"{setting}: {what} differs from eager by {(a - b).norm().item() / scale:.1e}")
    assert not failures, "\n".join(failures)


# ---- exactness of the inductor-compiled layers in float64 --------------------------------------------------
def _bn_eval(x, w, b, rm, rv, eps=1e-5):
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    return (x - v(rm)) / torch.sqrt(v(rv) + eps) * v(w) + v(b)


def _running_after(rm, rv, x, n):
    """Per-GPU BN's running statistics after one step: the average over GPUs of each GPU's usual update."""
    ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    _, means, uvars = ref_bn_train(x, ones, torch.zeros_like(ones), n)
    return (1 - MOMENTUM) * rm + MOMENTUM * means.mean(0), (1 - MOMENTUM) * rv + MOMENTUM * uvars.mean(0)


def _reference(name, x, p, buffers, training):
    """(y, expected buffers after the step) from the equations; ``p``: leaf copies of the layer's parameters."""
    C, n = x.shape[1], 2
    col = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    rm, rv = buffers.get("running_mean"), buffers.get("running_var")
    if name == "bn":
        if not training:
            return _bn_eval(x, p["weight"], p["bias"], rm, rv), buffers
        y, _, _ = ref_bn_train(x, p["weight"], p["bias"], n)
        rm1, rv1 = _running_after(rm, rv, x.detach(), n)
        return y, {**buffers, "running_mean": rm1, "running_var": rv1}
    if name == "brn":
        if not training:
            return _bn_eval(x, p["weight"], p["bias"], rm, rv), buffers
        y = ref_brn_train(x, p["weight"], p["bias"], rm, rv, n, 1.5, 0.5)
        rm1, rv1 = _running_after(rm, rv, x.detach(), n)
        return y, {**buffers, "running_mean": rm1, "running_var": rv1}
    if name == "sn":
        if not training:
            return ref_sn(x, p["mean_weight"], p["var_weight"], p["weight"], p["bias"], n, running=(rm, rv)), buffers
        y = ref_sn(x, p["mean_weight"], p["var_weight"], p["weight"], p["bias"], n)
        rm1, rv1 = _running_after(rm, rv, x.detach(), n)
        return y, {**buffers, "running_mean": rm1, "running_var": rv1}
    if name == "evonorm_b0":
        if not training:
            return ref_evonorm_b0(x, p["weight"], p["bias"], p["v"], x.shape[0], running_var=rv), buffers
        y = ref_evonorm_b0(x, p["weight"], p["bias"], p["v"], n)
        _, rv1 = _running_after(torch.zeros_like(rv), rv, x.detach(), n)
        return y, {**buffers, "running_var": rv1}
    if name in ("gn", "ln", "in"):
        return ref_group(x, {"gn": 2, "ln": 1, "in": C}[name], p["weight"], p["bias"]), buffers
    if name == "evonorm_s0":
        N, _, H, W = x.shape
        xg = x.reshape(N, 2, -1)
        var = ((xg - xg.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
        std = torch.sqrt(var + 1e-5).expand(N, 2, C // 2 * H * W).reshape(N, C, H, W)
        return x * torch.sigmoid(col(p["v"]) * x) / std * col(p["weight"]) + col(p["bias"]), buffers
    if name == "frn":
        nu2 = (x * x).mean((2, 3), keepdim=True)
        y = col(p["weight"]) * x / torch.sqrt(nu2 + 1e-6) + col(p["bias"])
        return torch.maximum(y, col(p["tau"])), buffers
    if name == "pono":
        xhat, _, _ = ref_pono(x)
        return xhat * col(p["weight"]) + col(p["bias"]), buffers
    if name == "none":
        return x, buffers
    raise AssertionError(f"no reference for {name}")


def _layer(name, channels_last):
    C = 4
    layer = build_norm(
        name, C, **OPTIONS.get(name, {}), **({"momentum": MOMENTUM} if "per_gpu_batch" in OPTIONS.get(name, {}) else {})
    )
    layer = layer.double()
    if name != "none":
        set_affine(layer)
    with torch.no_grad():
        for key in ("v", "tau", "mean_weight", "var_weight"):
            if hasattr(layer, key):
                getattr(layer, key).copy_(0.5 * rand(*getattr(layer, key).shape, seed=7))
        if hasattr(layer, "running_var"):
            layer.running_var.copy_(rand(C, seed=5).abs() + 0.5)
        if hasattr(layer, "running_mean"):
            layer.running_mean.copy_(0.5 * rand(C, seed=6))
    return layer.to(memory_format=torch.channels_last) if channels_last else layer


@ON_CPU_AND_CUDA
@pytest.mark.parametrize(
    "name,channels_last", [(n, False) for n in COMPILED] + [(n, True) for n in ("bn", "sn", "brn", "pono")]
)
def test_compiled_layer_matches_float64_formula(name, channels_last, device):
    layer = _layer(name, channels_last).to(device)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True, dynamic=False)
    for training in (True, False):
        layer.train(training)
        for p in layer.parameters():
            p.grad = None
        x = rand(8, 4, 3, 3, seed=11).to(device)
        x = x * 2.0 + 1.0  # an offset and a spread, so the mean and the variance both matter
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in layer.named_buffers() if v.is_floating_point()}
        upstream = rand(8, 4, 3, 3, seed=12).to(device)
        y = compiled(x)
        ref, expected_buffers = _reference(name, x_ref, params, buffers, training)
        where = f"{name} {'train' if training else 'eval'}"
        torch.testing.assert_close(y, ref.detach(), rtol=1e-9, atol=1e-9, msg=f"{where}: output")
        (y * upstream).sum().backward()
        (ref * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9, msg=f"{where}: input gradient")
        for k, v in layer.named_parameters():
            expected = params[k].grad if params[k].grad is not None else torch.zeros_like(v)
            got = v.grad if v.grad is not None else torch.zeros_like(v)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=f"{where}: gradient of {k}")
        for k, v in expected_buffers.items():
            torch.testing.assert_close(dict(layer.named_buffers())[k], v, rtol=1e-9, atol=1e-9, msg=f"{where}: {k}")


@needs_cxx
def test_compiled_brn_schedule_reads_the_step_before_its_update():
    """The schedule's rmax/dmax come from num_batches_tracked, which the same step increments: over four steps
    through the warm-up and the ramps, the compiled gradients follow the float64 formula with the limits of the
    step count before each step, and the running statistics the per-GPU BN update."""
    warmup, ramp_end, rmax_max, dmax_max = 1, 3, 3.0, 5.0
    layer = build_norm(
        "brn",
        4,
        schedule=True,
        warmup_steps=warmup,
        rmax_steps=ramp_end,
        dmax_steps=ramp_end,
        rmax_max=rmax_max,
        dmax_max=dmax_max,
        per_gpu_batch=2,
        momentum=MOMENTUM,
    ).double()
    set_affine(layer)
    with torch.no_grad():
        layer.running_mean.copy_(0.5 * rand(4, seed=6))
        layer.running_var.copy_(rand(4, seed=5).abs() + 0.5)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True, dynamic=False)
    for step in range(4):
        ramp = min(max((step - warmup) / (ramp_end - warmup), 0.0), 1.0)  # the schedule, written from its doc
        rmax, dmax = 1.0 + (rmax_max - 1.0) * ramp, dmax_max * ramp
        rm, rv = layer.running_mean.detach().clone(), layer.running_var.detach().clone()
        x = (rand(8, 4, 3, 3, seed=20 + step) * 3.0).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
        upstream = rand(8, 4, 3, 3, seed=30 + step)
        layer.zero_grad()
        (compiled(x) * upstream).sum().backward()
        ref = ref_brn_train(x_ref, params["weight"], params["bias"], rm, rv, 2, rmax, dmax)
        (ref * upstream).sum().backward()
        where = f"step {step} (rmax {rmax}, dmax {dmax})"
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9, msg=where)
        torch.testing.assert_close(layer.weight.grad, params["weight"].grad, rtol=1e-9, atol=1e-9, msg=where)
        rm1, rv1 = _running_after(rm, rv, x.detach(), 2)
        torch.testing.assert_close(layer.running_mean, rm1, rtol=1e-9, atol=1e-9, msg=where)
        torch.testing.assert_close(layer.running_var, rv1, rtol=1e-9, atol=1e-9, msg=where)
    assert int(layer.num_batches_tracked) == 4
