"""normbench.bn_eval (issue 12): PreciseBN and batch-statistics evaluation against float64 references computed
by hand from the same batches, buffers restored bit-exact, the EMA number equal to the plain evaluation, DDP."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.bn_eval import Regrouped, batch_statistic_layers, batch_stats_model, evaluations, precise_bn
from normbench.norms import build_norm

from conftest import REPO, TINY, compose
from float64 import D, from_gpu_chunks, gpu_chunks, rand, set_affine

EPS = 1e-5


class ListLoader:
    """A training loader over fixed batches per epoch index (any epoch: its own seeded batches)."""

    def __init__(self, batch, size=(3, 6, 6), batches_per_epoch=3):
        self.batch, self.size, self.batches_per_epoch, self.epoch = batch, size, batches_per_epoch, 5
        self.epochs_read = []

    def set_epoch(self, epoch):
        self.epoch = epoch

    def batches(self, epoch):
        return [rand(self.batch, *self.size, seed=1000 * abs(epoch) + b) for b in range(self.batches_per_epoch)]

    def __iter__(self):
        self.epochs_read.append(self.epoch)
        for x in self.batches(self.epoch):
            yield x, torch.zeros(x.shape[0], dtype=torch.long)


def two_bn_model(n, C=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        set_affine(build_norm("bn", C, per_gpu_batch=n)),
        nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1),
        set_affine(build_norm("bn", C, per_gpu_batch=n), seed=3),
    )
    model = model.double()
    with torch.no_grad():  # running statistics far from the data's, so that restoring them is visible
        for bn in (model[1], model[4]):
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(7.0)
    return model.eval()


def per_gpu_train_bn(x, bn, n):
    """Training-mode BN of each emulated GPU of n images (image i on GPU i mod k), with torch's F.batch_norm."""
    return from_gpu_chunks([F.batch_norm(c, None, None, bn.weight, bn.bias, True, 0.0, EPS) for c in gpu_chunks(x, n)])


def population(features):
    """Mean and biased variance over every value the layer saw: all images of all batches, all pixels."""
    allf = torch.cat(features)
    return allf.mean((0, 2, 3)), allf.var((0, 2, 3), correction=0)


@pytest.mark.parametrize("images, epochs", [(16, [-1]), (40, [-1, -2])])
def test_precise_bn_is_the_population_statistics_of_the_training_features(images, epochs):
    n, batch = 2, 8  # 4 emulated GPUs of 2 images
    model = two_bn_model(n)
    loader = ListLoader(batch)
    ran = precise_bn(model, loader, images=images)
    batches = [x for e in epochs for x in loader.batches(e)][: -(-images // batch)]
    assert ran == len(batches) and loader.epochs_read == epochs and loader.epoch == 5  # epoch index put back
    with torch.no_grad():
        f1 = [F.conv2d(x, model[0].weight, model[0].bias, padding=1) for x in batches]
        f2 = [F.conv2d(F.relu(per_gpu_train_bn(f, model[1], n)), model[3].weight, model[3].bias, padding=1) for f in f1]
    for bn, feats in ((model[1], f1), (model[4], f2)):
        mean, var = population(feats)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)
        # the spread of the per-GPU batch means is in it: more than the mean of the within-batch variances
        within = torch.stack([c.var((0, 2, 3), correction=0) for f in feats for c in gpu_chunks(f, n)]).mean(0)
        assert (var > within).all()
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("name", ["bn", "brn", "evonorm_b0"])
def test_batch_stats_normalizes_each_group_of_test_images_with_its_own_statistics(name):
    n, C = 4, 3
    layer = set_affine(build_norm(name, C, per_gpu_batch=n)).double()
    with torch.no_grad():  # running statistics that brn's r/d or an eval-mode forward would visibly use
        if hasattr(layer, "running_mean"):
            layer.running_mean.fill_(0.7)
        layer.running_var.fill_(2.5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    model = nn.Sequential(layer).eval()
    x = rand(2 * n + 3, C, 5, 4, seed=4)  # 2 GPUs of 4 images, then 3 left over: a group of their own
    y = batch_stats_model(model, n).eval()(x)

    def reference(g):  # float64 formula of the layer's training normalization on one group
        if name == "evonorm_b0":
            var_b = g.var((0, 2, 3), correction=0, keepdim=True)
            var_i = g.var((2, 3), correction=0, keepdim=True)
            den = torch.maximum(torch.sqrt(var_b + EPS), layer.v.view(1, C, 1, 1) * g + torch.sqrt(var_i + EPS))
            return g / den * layer.weight.view(1, C, 1, 1) + layer.bias.view(1, C, 1, 1)
        return F.batch_norm(g, None, None, layer.weight, layer.bias, True, 0.0, EPS)  # brn: r = 1, d = 0

    with torch.no_grad():
        expected = torch.cat(
            [from_gpu_chunks([reference(c) for c in gpu_chunks(x[: 2 * n], n)]), reference(x[2 * n :])]
        )
    torch.testing.assert_close(y, expected)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    if name == "brn":  # with the running statistics' r/d, training mode would give something else
        layer.train()
        assert not torch.allclose(layer(x[: 2 * n]), expected[: 2 * n])


def test_regroup_carries_the_leftover_images_and_keeps_the_order():
    xs = [rand(s, 1, 2, 2, seed=s) for s in (5, 5, 3)]
    loader = [(x, torch.arange(x.shape[0])) for x in xs]
    out = list(Regrouped(loader, 4))
    assert [x.shape[0] for x, _ in out] == [4, 4, 4, 1]
    torch.testing.assert_close(torch.cat([x for x, _ in out]), torch.cat(xs), rtol=0, atol=0)


def small_resnet(norm, per_gpu_batch=2):
    from normbench.models import CifarResNet
    from normbench.norms import norm_layer

    options = {"per_gpu_batch": per_gpu_batch} if norm != "gn" else {"groups": 2}
    torch.manual_seed(0)
    model = CifarResNet(8, norm_layer(norm, **options), num_classes=3, in_channels=3, width=4)
    model.train()
    with torch.no_grad():  # a few training forwards: running statistics of their own
        for _s in range(3):
            model(torch.randn(8, 3, 6, 6))
    return model.eval()


class EvalSet:
    def __init__(self, n=21, batch=8):
        g = torch.Generator().manual_seed(1)
        self.x, self.y, self.batch = torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g), batch

    def __iter__(self):
        for s in range(0, len(self.y), self.batch):
            yield self.x[s : s + self.batch], self.y[s : s + self.batch]


@torch.no_grad()
def top1_error(model, loader):
    model.eval()
    wrong = total = 0
    for x, y in loader:
        wrong += (model(x).argmax(1) != y).sum().item()
        total += y.numel()
    return {"top1_error": 100.0 * wrong / total}


class FloatLoader(ListLoader):
    def batches(self, epoch):
        return [b.float() for b in super().batches(epoch)]


@pytest.mark.parametrize("norm", ["bn", "sn", "brn", "evonorm_b0"])
def test_evaluations_leave_the_model_as_found_and_ema_is_the_plain_evaluation(norm):
    model = small_resnet(norm)
    untouched = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    loader, evalset = FloatLoader(8), EvalSet()
    out = evaluations(model, loader, evalset, top1_error, per_gpu_batch=2, precise_bn_images=32)
    assert set(out) == {"ema", "precise_bn", "batch_stats"}
    assert out["ema"] == top1_error(untouched, evalset)["top1_error"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)
    assert [m.training for m in model.modules()] == flags and loader.epoch == 5
    assert all(layer.per_gpu_batch == 2 for layer in batch_statistic_layers(model))


def test_a_model_without_batch_statistics_records_only_ema():
    out = evaluations(small_resnet("gn"), FloatLoader(8), EvalSet(), top1_error, per_gpu_batch=2, ema=12.5)
    assert out == {"ema": 12.5}


@torch.no_grad()
def logit_score(model, loader):
    """A stand-in for the top-1 error that moves with every logit (a wrong statistic cannot hide in a tie)."""
    model.eval()
    logits = torch.cat([model(x) for x, _ in loader])
    return {"top1_error": float((logits * torch.arange(1.0, logits.numel() + 1, dtype=D).view_as(logits)).sum())}


def test_evaluations_by_hand_on_a_tiny_model():
    """precise_bn and batch_stats numbers equal evaluations written out by hand in float64."""
    n = 2
    model = nn.Sequential(*two_bn_model(n), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    loader = ListLoader(8)
    x_eval, y_eval = rand(9, 3, 6, 6, seed=77), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    evalset = [(x_eval[:5], y_eval[:5]), (x_eval[5:], y_eval[5:])]
    out = evaluations(model, loader, evalset, logit_score, per_gpu_batch=n, precise_bn_images=24)
    conv1, bn1, conv2, bn2 = model[0], model[1], model[3], model[4]
    with torch.no_grad():
        f1 = [F.conv2d(x, conv1.weight, conv1.bias, padding=1) for x in loader.batches(-1)]
        f2 = [F.conv2d(F.relu(per_gpu_train_bn(f, bn1, n)), conv2.weight, conv2.bias, padding=1) for f in f1]
        (m1, v1), (m2, v2) = population(f1), population(f2)

        def head(x, stats1, stats2, group=n):
            h = F.conv2d(x, conv1.weight, conv1.bias, padding=1)
            h = (
                F.batch_norm(h, *stats1, bn1.weight, bn1.bias, False, 0.0, EPS)
                if stats1
                else per_gpu_train_bn(h, bn1, group)
            )
            h = F.conv2d(F.relu(h), conv2.weight, conv2.bias, padding=1)
            h = (
                F.batch_norm(h, *stats2, bn2.weight, bn2.bias, False, 0.0, EPS)
                if stats2
                else per_gpu_train_bn(h, bn2, group)
            )
            return h.mean((2, 3))

        def error(logits):
            return float((logits.detach() * torch.arange(1.0, logits.numel() + 1, dtype=D).view_as(logits)).sum())

        precise = error(head(x_eval, (m1, v1), (m2, v2)))
        # the eval loader's 5 + 4 images are regrouped to 4 + 4 + 1 (no group cut at the loader's batch): two
        # batches of 2 GPUs of 2 images (image i of a batch on GPU i mod 2), then image 8 alone over its 6x6 pixels
        grouped = torch.cat(
            [head(x_eval[:4], None, None), head(x_eval[4:8], None, None), head(x_eval[8:], None, None, group=None)]
        )
    assert out["ema"] == pytest.approx(
        error(head(x_eval, (bn1.running_mean, bn1.running_var), (bn2.running_mean, bn2.running_var))), rel=1e-12
    )
    assert out["precise_bn"] == pytest.approx(precise, rel=1e-9)
    assert out["batch_stats"] == pytest.approx(error(grouped), rel=1e-9)
    assert len({out["ema"], out["precise_bn"], out["batch_stats"]}) == 3


@pytest.mark.slow
def test_train_records_top1_error_by_eval(tmp_path):
    on = train_tiny(tmp_path / "on", "norm=bn", "bn_eval.precise_bn_images=64")
    by_eval = on["top1_error_by_eval"]
    assert set(by_eval) == {"ema", "precise_bn", "batch_stats"} and by_eval["ema"] == on["top1_error_final"]
    (result,) = (tmp_path / "on").rglob("result.json")
    assert json.loads(result.read_text())["top1_error_by_eval"] == by_eval
    off = train_tiny(tmp_path / "off", "norm=bn", "bn_eval.enabled=false")
    assert "top1_error_by_eval" not in off
    # bn_eval.enabled is an evaluation, not the training: not in the id; a non-default PreciseBN count is, as
    # it changes a recorded number
    from normbench.runs import run_id

    default_count = json.loads(result.read_text())["config"]
    default_count["bn_eval"]["precise_bn_images"] = 8192
    assert off["run_id"] == run_id(default_count) != on["run_id"]
    assert off["top1_error_final"] == on["top1_error_final"]
    assert train_tiny(tmp_path / "gn", "norm=gn")["top1_error_by_eval"].keys() == {"ema"}


def train_tiny(results_dir, *extra):
    from normbench.train import train

    return train(compose(TINY + ["epochs=1", f"results_dir={results_dir}", *extra]))


@pytest.mark.parametrize("override", ["bn_eval.precise_bn_images=0", "bn_eval.enabled=maybe"])
def test_bad_bn_eval_setting_fails_before_training(tmp_path, override):
    from normbench.train import ConfigError

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        train_tiny(tmp_path, override)
    assert not list(tmp_path.rglob("*.json"))


DDP_SCRIPT = """
import os, sys, torch
from omegaconf import OmegaConf
from normbench import distributed
from normbench.bn_eval import precise_bn
from normbench.data import build_data
from normbench.models import CifarResNet
from normbench.norms import norm_layer
d = distributed.setup("cpu")
cfg = OmegaConf.merge(OmegaConf.load(sys.argv[3]), {"num_train": 256, "num_eval": 16, "image_size": 8,
                                                    "num_classes": 4, "augment": {"crop_padding": 1, "flip": True}})
data = build_data(cfg, global_batch=16, rank=d.rank, world_size=d.world_size, seed=3)
torch.manual_seed(0)
model = CifarResNet(8, norm_layer(sys.argv[2], per_gpu_batch=2), num_classes=4, in_channels=3, width=4).double()
precise_bn(model, data.train, images=96, forward=lambda m, x: m(x.double()), dist=d)
if d.is_main:
    torch.save({k: v for k, v in model.state_dict().items() if "running" in k}, sys.argv[1])
distributed.teardown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["bn", "sn"])
def test_two_process_precise_bn_equals_one_process_emulation(tmp_path, norm):
    script = tmp_path / "precise.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    data_cfg = str(REPO / "configs" / "data" / "synthetic.yaml")
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.pt"), norm, data_cfg],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path / "two.pt"),
            norm,
            data_cfg,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a.keys() == b.keys() and any(k.endswith("running_var") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12, msg=k)


def test_batch_stats_do_not_depend_on_the_eval_batch_which_is_not_part_of_the_run_id(tmp_path):
    # data.eval_batch is left out of the run's identity, so no recorded number may depend on it: the run with
    # every test image in one loader batch is the reference for loader batches that cut the groups anywhere.
    whole = train_tiny(tmp_path / "a", "norm=bn", "data.eval_batch=1000")
    for eval_batch in (7, 13, 64):
        cut = train_tiny(tmp_path / f"b{eval_batch}", "norm=bn", f"data.eval_batch={eval_batch}")
        assert cut["run_id"] == whole["run_id"]
        assert cut["top1_error_by_eval"] == whole["top1_error_by_eval"], eval_batch


def test_regroup_to_a_fixed_batch_keeps_every_image_in_order():
    loader = [(torch.arange(i, i + 5), torch.arange(i, i + 5)) for i in range(0, 23, 5)]  # 25 images in fives
    out = list(Regrouped(loader, 4, batch=8))
    assert [x.shape[0] for x, _ in out] == [8, 8, 8, 1]
    assert torch.equal(torch.cat([x for x, _ in out]), torch.arange(25))
