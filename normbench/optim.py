"""SGD with the papers' weight decay, and the learning-rate schedule as a function of the optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn

from normbench.config import BatchGeometry


def learning_rate(cfg) -> float:
    """Linear scaling rule of the papers: lr = base_lr x (gpus x per_gpu_batch) / reference_batch.
    `cfg`: the run's config, as a DictConfig or a plain dict."""
    return cfg["base_lr"] * BatchGeometry(cfg["gpus"], cfg["per_gpu_batch"]).images_per_step / cfg["reference_batch"]


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm: bool) -> list[dict]:
    """The papers decay every weight, norm gamma/beta (and SN's importance logits) included. With
    decay_norm=False the parameters of norm layers -- ours too, which torchvision's grouping misses -- and all
    biases go to a group without decay."""
    from normbench.norms import is_norm_layer

    if decay_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    exempt = set()
    for module in model.modules():
        if is_norm_layer(module):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            exempt.add(id(param))
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    optim = cfg["optim"]
    groups = parameter_groups(model, optim["weight_decay"], optim["decay_norm"])
    return torch.optim.SGD(groups, lr=learning_rate(cfg), momentum=optim["momentum"], nesterov=optim["nesterov"])


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then `step` decay by `gamma`
    at fractions `milestones` of training, or half-cosine to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule["name"] == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    passed = sum(step >= round(m * total_steps) for m in schedule["milestones"])
    return schedule["gamma"] ** passed


def build_scheduler(optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total, schedule = cfg["epochs"] * steps_per_epoch, cfg["schedule"]
    warmup = round(schedule["warmup_epochs"] * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, schedule))
