"""BN's small-batch gap, decomposed: three evaluations of the final model for batch-dependent layers.

Why does BN lose at 2 images per GPU? The GN paper's curve mixes two causes: the population statistics used at
test time (an EMA of noisy per-GPU batches) and training with noisy normalization itself. Following Wu & Johnson,
"Rethinking 'Batch' in BatchNorm" (2021) (EvalNorm, Singh & Shrivastava 2019, and SN's batch average correct the
evaluation statistics the same way), the final model is evaluated three ways (``top1_error_by_eval``):

* ``ema``: the running statistics as trained (the number every epoch reports).
* ``precise_bn``: population statistics recomputed with the final weights over ``precise_bn_images`` training
  images, with the training augmentation, in the training's batches (per-GPU statistics of ``per_gpu_batch``
  images): the mean of the per-batch means and the variance of all values seen, which contains the spread of the
  batch means (why: :mod:`normbench.norms.reestimate`). The images are those of a training "epoch" no training
  epoch uses (index -1, then -2, ...), so the training order of what follows is untouched. Under DDP each rank
  re-estimates from its share of the global batches and the sums are added across ranks.
* ``batch_stats``: every test image normalized with the statistics of its own mini-batch of ``per_gpu_batch``
  test images, as in training (image ``i`` of a batch of ``k x per_gpu_batch`` on GPU ``i mod k``). The test
  stream is regrouped so that every group but possibly the last has ``per_gpu_batch`` images: a shard whose size
  is not a multiple of ``per_gpu_batch`` ends with one group of its last ``shard mod per_gpu_batch`` images,
  normalized with their own statistics. Batch Renorm uses plain batch statistics in this mode (r = 1, d = 0):
  its r and d correct the batch statistics toward the running ones, which would bring the EMA back in, the very
  thing this evaluation leaves out. EvoNorm-B0 uses its batch variance, SN its per-GPU BN part.

Batch-dependent layers: ``bn``, ``brn``, ``evonorm_b0``, and ``sn`` with its BN part. A model without one gets
only ``ema``. ``syncbn`` is not covered (its statistics span the real processes; not the papers' setting).
:func:`evaluations` leaves every buffer (the EMA statistics), every train/eval flag and every layer option as it
found them.

Cost: one train-mode forward over ``precise_bn_images`` training images and two passes over the test set. Measured
(preset=fashion_mnist, bn, 8 GPUs x 2 images, OMP_NUM_THREADS=1 on a shared 2-core CPU): 65.7 s, about 0.9 of one
training epoch of that run (62.6-74.0 s), so ~9% of the preset's 10 epochs; ``bn_eval.enabled=false`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from normbench import distributed
from normbench.norms import batch_statistic_layers, buffers_kept
from normbench.norms.reestimate import reestimate_statistics

__all__ = ["evaluations", "batch_statistic_layers", "precise_bn", "batch_stats_model", "Regrouped", "EVALS"]

EVALS = ("ema", "precise_bn", "batch_stats")
PRECISE_BN_FIRST_EPOCH = -1  # the loader epoch PreciseBN reads (then -2, ...): no training epoch uses it


def _training_images(loader, images: int, world_size: int) -> Iterator[Tensor]:
    """At least ``images`` training images (counted over all ranks) in the loader's batches, from epochs
    PRECISE_BN_FIRST_EPOCH, -2, ...; the loader's epoch is put back afterwards."""
    previous = getattr(loader, "epoch", None)
    seen, epoch = 0, PRECISE_BN_FIRST_EPOCH
    try:
        while seen < images:
            loader.set_epoch(epoch)
            for x, _ in loader:
                yield x
                seen += x.shape[0] * world_size
                if seen >= images:
                    break
            epoch -= 1
    finally:
        if previous is not None:
            loader.set_epoch(previous)


def precise_bn(model: nn.Module, train_loader, *, images: int = 8192, forward=None, dist=None) -> int:
    """Write PreciseBN population statistics into the batch-dependent layers' running buffers (see the module
    docstring); returns the batches this process ran. The caller restores the EMA statistics."""
    d = dist or distributed.Dist()
    reduce = (lambda t: distributed.all_reduce_sum(t, d)) if d.enabled else None
    return reestimate_statistics(
        model,
        batch_statistic_layers(model),
        _training_images(train_loader, images, d.world_size),
        variance="population",
        forward=forward,
        reduce=reduce,
    )


@contextmanager
def _layer_options(layers, **values):
    saved = [(layer, {k: getattr(layer, k) for k in values if hasattr(layer, k)}) for layer in layers]
    try:
        for layer, present in saved:
            for key in present:
                setattr(layer, key, values[key])
        yield
    finally:
        for layer, present in saved:
            for key, value in present.items():
                setattr(layer, key, value)


class _OwnBatchStatistics(nn.Module):
    """The model with its batch-dependent layers always in training mode (an evaluation function's
    ``model.eval()`` included), on groups of ``per_gpu_batch`` images; a batch's last images that fill no group
    form one smaller group. Buffers are put back after every forward (no EMA update, no step counted)."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], per_gpu_batch: int):
        super().__init__()
        self.model, self.per_gpu_batch = model, per_gpu_batch
        self.__dict__["_layers"] = layers  # not submodules twice

    def train(self, mode: bool = True):
        super().train(mode)
        for layer in self.__dict__["_layers"]:
            layer.training = True
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        layers, n = self.__dict__["_layers"], self.per_gpu_batch
        full = x.shape[0] // n * n
        out = []
        with buffers_kept(self.model), _layer_options(layers, rmax=1.0, dmax=0.0, schedule=False):  # brn: plain
            if full:
                with _layer_options(layers, per_gpu_batch=n):
                    out.append(self.model(x[:full]))
            if full < x.shape[0]:
                with _layer_options(layers, per_gpu_batch=None):  # the leftover images: one group
                    out.append(self.model(x[full:]))
        return out[0] if len(out) == 1 else torch.cat(out)


def batch_stats_model(model: nn.Module, per_gpu_batch: int) -> nn.Module:
    """``model`` seen through :class:`_OwnBatchStatistics` (call it in eval mode, on :class:`Regrouped`'s batches)."""
    return _OwnBatchStatistics(model, batch_statistic_layers(model), per_gpu_batch)


class Regrouped:
    """An eval loader re-batched so that every batch but the last is a multiple of ``per_gpu_batch`` images
    (the few images a batch leaves over are carried into the next), so no group of ``per_gpu_batch`` test images
    is cut by the loader's batch size. Order and images unchanged."""

    def __init__(self, loader, per_gpu_batch: int, batch: int | None = None):
        self.loader, self.per_gpu_batch, self.batch = loader, per_gpu_batch, batch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.batch:
            yield from self._fixed()
            return
        n, carry = self.per_gpu_batch, None
        for x, y in self.loader:
            if carry is not None:
                x, y = torch.cat([carry[0], x]), torch.cat([carry[1], y])
            full = x.shape[0] // n * n
            carry = (x[full:], y[full:]) if full < x.shape[0] else None
            if full:
                yield x[:full], y[:full]
        if carry is not None:
            yield carry

    def _fixed(self):
        """Batches of exactly ``batch`` images (the last one fewer): which test images share a group -- image
        ``i`` of a batch on GPU ``i mod k`` -- then depends on ``batch``, never on the loader's data.eval_batch,
        which is not part of a run's identity."""
        size, xs, ys, have = self.batch, [], [], 0
        for x, y in self.loader:
            xs.append(x), ys.append(y)
            have += x.shape[0]
            while have >= size:
                x_all, y_all = torch.cat(xs), torch.cat(ys)
                yield x_all[:size], y_all[:size]
                xs, ys, have = [x_all[size:]], [y_all[size:]], have - size
        if have:
            yield torch.cat(xs), torch.cat(ys)


def evaluations(
    model: nn.Module,
    train_loader,
    eval_loader,
    evaluate: Callable[[nn.Module, object], dict],
    *,
    per_gpu_batch: int,
    precise_bn_images: int = 8192,
    forward=None,
    dist=None,
    ema: float | None = None,
    group_batch: int | None = None,
) -> dict[str, float]:
    """``{"ema": ..., "precise_bn": ..., "batch_stats": ...}`` (top-1 error %) of the final ``model``; only
    ``ema`` when it has no batch-dependent layer. ``evaluate(model, loader) -> {"top1_error": ...}`` is the
    trainer's evaluation; ``ema`` reuses a top-1 error already measured on this exact model. ``forward(model, x)``
    runs a re-estimation batch as training does (autocast, channels_last). Call it once, after the last epoch:
    the model's buffers, flags and layer options are as they were when it returns. ``group_batch``: the test
    images per batch_stats forward (a multiple of ``per_gpu_batch``; the trainer passes its per-process training
    batch), so the groups do not depend on the eval loader's batch size."""
    if group_batch is not None and (group_batch < 1 or group_batch % per_gpu_batch):
        raise ValueError(f"bn_eval: group_batch={group_batch} must be a positive multiple of {per_gpu_batch}")
    if not isinstance(per_gpu_batch, int) or per_gpu_batch < 1:
        raise ValueError(f"bn_eval: per_gpu_batch={per_gpu_batch!r} must be a positive integer")
    if not isinstance(precise_bn_images, int) or precise_bn_images < 1:
        raise ValueError(f"bn_eval.precise_bn_images={precise_bn_images!r} must be a positive integer, e.g. 8192")
    if ema is None:
        ema = evaluate(model, eval_loader)["top1_error"]
    result = {"ema": ema}
    layers = batch_statistic_layers(model)
    if not layers:
        return result
    # SN: the training-mode forwards here do not make its statistics stale (buffers_kept puts the flag back)
    with buffers_kept(model) as restore_buffers:
        precise_bn(model, train_loader, images=precise_bn_images, forward=forward, dist=dist)
        result["precise_bn"] = evaluate(model, eval_loader)["top1_error"]
        restore_buffers()
        test_batches = Regrouped(eval_loader, per_gpu_batch, group_batch)
        result["batch_stats"] = evaluate(batch_stats_model(model, per_gpu_batch), test_batches)["top1_error"]
    return result
