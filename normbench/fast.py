"""Where and how fast a run computes: the device, the `fast.*` switches resolved (bf16, channels_last,
torch.compile, CUDA graphs) and the compiled step functions. None of it changes a run's numbers beyond float
error except the precision, which is part of the run's identity (normbench.runs).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from normbench.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def fast_settings(config: dict, device: torch.device) -> dict:
    """Resolve `auto` switches: on for CUDA, off on the CPU.

    On the CPU bf16 and channels_last change numbers but not speed, and compiling does not pay for itself at
    CPU scale: ResNet-8 at 8x32 on one core steps 0.79x (BN), 1.08x (GN), 0.73x (SN) of eager's time once
    compiled, after 15-36 s of compiling (scripts/bench_train.py --mode eager / compiled), and a CPU run is a
    few hundred steps. CUDA graphs stay opt-in (`fast.cuda_graphs=true`) until measured on a GPU."""
    fast, on_gpu = config["fast"], device.type == "cuda"
    amp = fast["amp"] if fast["amp"] != "auto" else ("bf16" if on_gpu else "none")
    compile_ = on_gpu if fast["compile"] == "auto" else fast["compile"]
    cuda_graphs = False if fast["cuda_graphs"] == "auto" else fast["cuda_graphs"]
    if cuda_graphs and not on_gpu:
        raise ConfigError(f"fast.cuda_graphs=true needs a CUDA device (this run is on {device}); drop it")
    if cuda_graphs and not compile_:
        raise ConfigError("fast.cuda_graphs=true captures the compiled step; set fast.compile=true with it")
    return {
        "amp": amp,
        "channels_last": on_gpu if fast["channels_last"] == "auto" else fast["channels_last"],
        "compile": compile_,
        "cuda_graphs": cuda_graphs,
        "cudnn_benchmark": fast["cudnn_benchmark"],
    }


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()


def make_steps(train_model, raw_model, fast: dict, autocast) -> tuple[Callable, Callable]:
    """The training step's forward and loss, and the evaluation forward, compiled when ``fast["compile"]``.

    Static shapes (``dynamic=False``): training batches all have one size (the last partial batch is dropped)
    and :func:`evaluate` pads a partial evaluation batch, so neither recompiles. The training step and the
    evaluation forward are separate compiled functions, so switching between them recompiles nothing either.
    Compiling wraps nothing that is saved: checkpoints hold the raw model's state dict (no ``_orig_mod.``)."""

    def forward_loss(images, labels):
        with autocast():
            return F.cross_entropy(train_model(images), labels)

    def eval_forward(images):
        with autocast():
            return raw_model(images).float()

    if not fast["compile"]:
        return forward_loss, eval_forward
    mode = "reduce-overhead" if fast["cuda_graphs"] else None  # CUDA graphs: one launch for the whole step
    return torch.compile(forward_loss, dynamic=False, mode=mode), torch.compile(eval_forward, dynamic=False)
