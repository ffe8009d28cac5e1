"""Learning-rate schedule and weight-decay groups against the recipe (docs/papers.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from normbench.models import build_model
from normbench.norms import norm_layer
from normbench.optim import build_optimizer, build_scheduler, learning_rate, lr_factor, parameter_groups

STEP = OmegaConf.create({"name": "step", "milestones": [0.3, 0.6, 0.9], "gamma": 0.1})
COSINE = OmegaConf.create({"name": "cosine", "milestones": [], "gamma": 0.1})


def test_linear_scaling_rule():
    cfg = OmegaConf.create({"base_lr": 0.1, "gpus": 8, "per_gpu_batch": 2, "reference_batch": 256})
    assert learning_rate(cfg) == pytest.approx(0.1 * 16 / 256)


def test_step_schedule_decays_at_epochs_30_60_90_of_100():
    total = 1000
    expected = {0: 1.0, 299: 1.0, 300: 0.1, 599: 0.1, 600: 0.01, 899: 0.01, 900: 0.001, 999: 0.001}
    for step, factor in expected.items():
        assert lr_factor(step, total, 0, STEP) == pytest.approx(factor), step


def test_scheduler_steps_the_recipe_through_a_real_optimizer():
    """100 epochs of 10 steps: lr 0.1 x (8 x 32) / 256, x0.1 entering epochs 30, 60 and 90
    (docs/papers.md section 2)."""
    cfg = OmegaConf.create(
        {
            "base_lr": 0.1,
            "gpus": 8,
            "per_gpu_batch": 32,
            "reference_batch": 256,
            "epochs": 100,
            "schedule": {**STEP, "warmup_epochs": 0},
            "optim": {"momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "decay_norm": True},
        }
    )
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lr_at_epoch = {}
    for step in range(1000):
        lr_at_epoch.setdefault(step // 10, optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for epoch, lr in {0: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 0.001, 89: 0.001, 90: 1e-4, 99: 1e-4}.items():
        assert lr_at_epoch[epoch] == pytest.approx(lr), epoch


def test_warmup_then_half_cosine():
    total, warmup = 1000, 100
    for step in (0, 49, 99):
        assert lr_factor(step, total, warmup, COSINE) == pytest.approx((step + 1) / warmup)
    for step in (100, 550, 999):
        progress = (step - warmup) / (total - warmup)
        assert lr_factor(step, total, warmup, COSINE) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("name, options", [("gn", {"groups": 2}), ("sn", {"per_gpu_batch": 2}), ("frn", {})])
def test_decay_norm_false_exempts_custom_norm_layers(name, options):
    cfg = OmegaConf.create(
        {"name": "cifar_resnet", "depth": 8, "width": 4, "zero_init_last_gamma": True, "weight_standardization": False}
    )
    model = build_model(cfg, norm_layer(name, **options), 10, 1)
    decayed, exempt = parameter_groups(model, 1e-4, decay_norm=False)
    exempt_ids = {id(p) for p in exempt["params"]}
    norm_params = [
        p
        for m in model.modules()
        if type(m).__module__.startswith("normbench.norms")
        for p in m.parameters(recurse=False)
    ]
    assert norm_params and all(id(p) in exempt_ids for p in norm_params)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(id(w) not in exempt_ids for w in convs) and exempt["weight_decay"] == 0.0
    (everything,) = parameter_groups(model, 1e-4, decay_norm=True)  # the papers: decay on all weights
    assert len(everything["params"]) == len(list(model.parameters())) and everything["weight_decay"] == 1e-4
