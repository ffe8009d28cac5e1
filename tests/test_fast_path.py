"""The fast path (issue: GPU fast path): bf16 autocast keeps norm statistics in float32, the switches change a
run's numbers only by float error, and on a GPU: layouts stay channels_last and a step never syncs the host.
GPU tests are marked `gpu` (`pytest -m gpu` selects them; conftest skips them where there is no CUDA device)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from normbench.fast import fast_settings
from normbench.norms import NORM_NAMES, build_norm
from normbench.train import train

from conftest import TINY, compose

BATCH_DEPENDENT = {
    "bn": {"per_gpu_batch": 4},
    "sn": {"per_gpu_batch": 4},
    "brn": {"per_gpu_batch": 4},
    "evonorm_b0": {"per_gpu_batch": 4},
}
OPTIONS = {**BATCH_DEPENDENT, "gn": {"groups": 4}, "evonorm_s0": {"groups": 4}}


def _reference_bn(x64: torch.Tensor, chunks: int) -> torch.Tensor:
    """Per-GPU BN (training, gamma 1, beta 0) in float64, straight from the equations; image i on GPU i mod k."""
    n, c, h, w = x64.shape
    v = x64.reshape(n // chunks, chunks, c, h, w)
    mean = v.mean(dim=(0, 3, 4), keepdim=True)
    var = v.var(dim=(0, 3, 4), unbiased=False, keepdim=True)
    return ((v - mean) / torch.sqrt(var + 1e-5)).reshape(n, c, h, w)


@pytest.mark.parametrize("name", ["bn", "sn"])
def test_bf16_autocast_keeps_statistics_in_float32(name):
    """Data offset far from zero: statistics summed in bf16 (8 mantissa bits) would lose the variance."""
    torch.manual_seed(0)
    x = (torch.randn(16, 8, 12, 12) * 0.5 + 30.0).bfloat16()
    layer = build_norm(name, 8, **OPTIONS[name])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    if name == "sn":  # one-hot BN weights so the layer is plain per-GPU BN
        layer.mean_weight.data = torch.tensor([-1e4, -1e4, 1e4])
        layer.var_weight.data = torch.tensor([-1e4, -1e4, 1e4])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    reference = _reference_bn(x.double(), chunks=4)
    assert torch.isfinite(y).all()
    # bf16 output rounding is ~0.4% of |y| <= ~3; float32 statistics keep the error at that level
    torch.testing.assert_close(y.double(), reference, rtol=0.02, atol=0.03)


@pytest.mark.parametrize("name", [n for n in NORM_NAMES if n != "none"])
def test_every_layer_under_bf16_autocast_matches_float32(name):
    """The same layer (non-trivial affine parameters) on the same bf16-representable input, with and without
    autocast: output and input gradient agree to bf16 rounding (~0.4% per value; norm-wise ~0.3%). A layer that
    drops an affine term, or sums its statistics in bf16, is off by far more."""
    torch.manual_seed(0)
    x = (torch.randn(8, 8, 6, 6) * 2.0 + 3.0).bfloat16().float()
    layer = build_norm(name, 8, **OPTIONS.get(name, {}))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer32 = copy.deepcopy(layer)
    upstream = torch.randn(8, 8, 6, 6)
    x_amp, x32 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x_amp.bfloat16() if name != "pono" else x_amp)
    (y.float() * upstream).sum().backward()
    y32 = layer32(x32)
    (y32 * upstream).sum().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x_amp.grad).all()
    assert ((y.float() - y32).norm() / y32.norm()).item() < 0.01, name
    # FRN's TLU max(y, tau) has a kink: bf16 rounding moves a few values across it, and their gradient with them
    grad_tolerance = 0.05 if name == "frn" else 0.01
    assert ((x_amp.grad - x32.grad).norm() / x32.grad.norm()).item() < grad_tolerance, name


def test_auto_switches_are_off_on_the_cpu_and_on_for_cuda():
    cfg = compose(TINY)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    assert fast_settings(config, torch.device("cpu")) == {
        "amp": "none",
        "channels_last": False,
        "compile": False,
        "cuda_graphs": False,
        "cudnn_benchmark": True,
    }
    on_cuda = fast_settings(config, torch.device("cuda"))
    assert (on_cuda["amp"], on_cuda["channels_last"], on_cuda["compile"], on_cuda["cuda_graphs"]) == (
        "bf16",
        True,
        True,
        False,
    )


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["fast.cuda_graphs=true"], "needs a CUDA device"),
        (["fast.cuda_graphs=true", "fast.compile=false", "device=cpu"], "needs a CUDA device"),
        (["fast.compile=maybe"], "fast.compile=maybe is not valid: fast.compile must be one of auto, true, false"),
    ],
)
def test_bad_fast_switches_fail_in_one_line(overrides, match):
    from normbench.train import ConfigError

    with pytest.raises(ConfigError, match=match):
        train(compose(TINY + overrides))


def _epoch_rows(results_dir) -> list[dict]:
    (metrics,) = results_dir.rglob("metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.mark.slow
def test_bf16_run_matches_float32_run_within_bf16_error(tmp_path):
    plain = train(compose(TINY + [f"results_dir={tmp_path / 'a'}", "epochs=1", "fast.amp=none"]))
    fast = train(compose(TINY + [f"results_dir={tmp_path / 'b'}", "epochs=1", "fast.amp=bf16"]))
    # the precision a run trains in is part of its identity: a bf16 run never reuses an fp32 run's directory
    assert plain["run_id"] != fast["run_id"]
    assert fast["status"] == "completed"
    # 128 eval images: bf16 rounding may flip the class of an image or two, not more
    assert abs(plain["top1_error_final"] - fast["top1_error_final"]) <= 2 * 100 / 128
    (a,), (b,) = (_epoch_rows(tmp_path / d) for d in ("a", "b"))
    for key in ("train_loss", "eval_loss"):
        assert a[key] != b[key], f"{key} bit-identical: bf16 autocast did not run"
        assert abs(a[key] - b[key]) <= 2e-3 * abs(a[key]), (key, a[key], b[key])  # measured: ~3e-5 relative


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in NORM_NAMES if n != "none"])
def test_cuda_layers_keep_channels_last_under_bf16(name):
    x = torch.randn(8, 32, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    layer = build_norm(name, 32, **OPTIONS.get(name, {})).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.gpu
def test_cuda_per_gpu_bn_on_channels_last_matches_float64():
    """CUDA's per-GPU BN path for channels_last input (a layout copy, then cuDNN's BN over the (n, k*C, H, W)
    view): output, input gradient and running statistics against the float64 equations."""
    torch.manual_seed(2)
    base = torch.randn(16, 8, 7, 7) * 2.0 + 1.0
    upstream = torch.randn(16, 8, 7, 7, dtype=torch.float64)
    layer = build_norm("bn", 8, per_gpu_batch=4).cuda()
    x = base.cuda().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (y.double() * upstream.cuda()).sum().backward()
    x64 = base.double().requires_grad_(True)
    ref = _reference_bn(x64, chunks=4)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(y.double().cpu(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, atol=1e-5, rtol=1e-5)
    v = base.double().reshape(4, 4, 8, 7, 7)  # (n, k, C, H, W): image i on GPU i mod k
    mean_k, var_k = v.mean(dim=(0, 3, 4)), v.var(dim=(0, 3, 4), unbiased=True)  # (k, C)
    torch.testing.assert_close(layer.running_mean.double().cpu(), 0.1 * mean_k.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_var.double().cpu(), 0.9 + 0.1 * var_k.mean(0), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bn", "gn", "sn", "brn", "evonorm_b0"])
def test_cuda_training_step_never_syncs_the_host(name):
    from omegaconf import OmegaConf

    from normbench.models import build_model
    from normbench.norms import norm_layer

    model_cfg = OmegaConf.create(
        {"name": "cifar_resnet", "depth": 8, "width": 16, "zero_init_last_gamma": True, "weight_standardization": False}
    )
    model = (
        build_model(model_cfg, norm_layer(name, **OPTIONS.get(name, {"groups": 8} if name == "gn" else {})), 10, 3)
        .cuda()
        .to(memory_format=torch.channels_last)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device="cuda")
    for step in range(3):
        if step == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_bf16_gradient_of_per_gpu_bn_matches_float64():
    torch.manual_seed(1)
    base = (torch.randn(16, 8, 12, 12) * 0.5 + 30.0).bfloat16()
    upstream = torch.randn(16, 8, 12, 12, dtype=torch.float64)
    x = base.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = build_norm("bn", 8, per_gpu_batch=4)(x)
    (y.double() * upstream).sum().backward()
    x64 = base.double().requires_grad_(True)
    (_reference_bn(x64, chunks=4) * upstream).sum().backward()
    scale = x64.grad.abs().max().item()
    assert (x.grad.double() - x64.grad).abs().max().item() < 0.03 * scale
