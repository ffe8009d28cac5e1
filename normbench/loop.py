"""The training loop, short enough to read in one sitting: one epoch of steps (``train_one_epoch``) and one
evaluation pass (``evaluate``). A step processes ``gpus x per_gpu_batch`` images; the step function itself
(eager or compiled) comes from normbench.fast.make_steps. No host sync inside a step: the divergence check and
the progress bar read the loss every ``logger.check_every`` steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from normbench import distributed
from normbench.checkpoints import StepCheckpoints
from normbench.fast import autocast
from normbench.progress import progress
from normbench.runs import interrupts

log = logging.getLogger("normbench")


class Diverged(Exception):
    pass


@dataclass
class Loop:
    """What every step needs besides the model, the data and the optimizer."""

    device: torch.device
    dist: distributed.Dist
    raw_model: torch.nn.Module  # the model without DDP/compile wrappers (its buffers are the running stats)
    channels_last: bool
    sync_buffers_every_step: bool  # layers that read running stats while training (batch renorm) under DDP
    show_progress: bool
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler  # a no-op unless fp16: bf16 and float32 need no loss scaling
    images_per_step: int  # gpus x per_gpu_batch, over all processes (BatchGeometry)
    epochs: int
    check_every: int  # steps between divergence checks (logger.check_every): each one waits for the device
    forward_loss: Callable  # (images, labels) -> loss of the training model: compiled or eager (make_steps)
    eval_forward: Callable  # images -> logits of the raw model in eval mode: compiled or eager
    cuda_graphs: bool = False
    compile_pending: bool = False  # the next step compiles: timed and logged once, then cleared
    step_checkpoints: StepCheckpoints | None = None  # checkpoint.every_minutes > 0: written between steps
    every_steps: int = 50  # logger.every_steps: per-step curves (log_steps) this often
    log_steps: Callable[[dict, int], None] | None = None  # (scalars, global step) -> dashboards; None: off

    def autocast(self):
        return autocast(self.device, self.amp_dtype)


def train_one_epoch(model, loader, optimizer, scheduler, epoch, loop: Loop, resume: dict | None = None) -> dict:
    """One epoch of steps; ``resume`` (from a step checkpoint) starts it at ``resume["step"]`` with the partial
    metrics of the steps already done."""
    model.train()
    resume = resume or {}
    start_step = int(resume.get("step", 0))
    loader.set_epoch(epoch, start_step=start_step)
    device, d = loop.device, loop.dist
    images_per_step, steps = loop.images_per_step, len(loader)
    loss_sum = resume["loss_sum"].to(device) if "loss_sum" in resume else torch.zeros((), device=device)
    time_before = float(resume.get("epoch_time_s", 0.0))  # the epoch's time in earlier attempts
    lr = float(resume.get("lr", optimizer.param_groups[0]["lr"]))  # the epoch's first learning rate (its row's)
    compile_s = 0.0  # the first compiled step's time: kept out of images/s, which measures the compiled steps
    start = time.perf_counter()

    def partial() -> dict:  # the epoch so far, for a step checkpoint (with the per-step curve's open interval)
        return {
            "loss_sum": loss_sum,
            "epoch_time_s": time_before + time.perf_counter() - start,
            "lr": lr,
            "logged_step": logged[0],
            "logged_loss_sum": logged[1],
        }

    checkpoints = loop.step_checkpoints if loop.step_checkpoints and loop.step_checkpoints.enabled else None
    if checkpoints:
        checkpoints.epoch_started(epoch, start_step)
    bar = progress(loader, steps - start_step, f"epoch {epoch + 1}/{loop.epochs}", loop.show_progress)
    # the per-step curves' last point: (step, loss sum, time); the loss is read once per logger.every_steps.
    # Resumed mid-interval, the interval starts where the killed attempt's last point ended: the same curve.
    logged = (int(resume.get("logged_step", start_step)), float(resume.get("logged_loss_sum", 0.0)), start)
    if loop.log_steps and start_step and "logged_loss_sum" not in resume:  # a step checkpoint from before this
        logged = (start_step, loss_sum.item(), start)
    timed = logged[0] >= start_step  # an interval has a rate unless it spans a resume or holds the compiling step
    with interrupts.holding_to_step_end() if checkpoints else contextlib.nullcontext():
        for step, (images, labels) in enumerate(bar, start=start_step):
            if loop.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if loop.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
            first_compiled, loop.compile_pending = loop.compile_pending, False
            if first_compiled:
                compile_start, timed = time.perf_counter(), False
            loss = loop.forward_loss(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loop.scaler.scale(loss).backward()
            loop.scaler.step(optimizer)
            loop.scaler.update()
            scheduler.step()
            if loop.sync_buffers_every_step:
                distributed.average_buffers(loop.raw_model, d)
            loss_sum += loss.detach()
            if first_compiled:  # one wait for the device, once per run: the compile time is worth knowing
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                compile_s = time.perf_counter() - compile_start
                log.info("torch.compile: the first training step took %.1fs (compiling)", compile_s)
            # The loss sum is read from the device only every so often (each read waits for it), and once:
            # the divergence check, the progress bar and the dashboards' curves share that one read.
            at_check = (step + 1) % loop.check_every == 0 or step + 1 == steps
            at_log = loop.log_steps is not None and (step + 1) % loop.every_steps == 0
            total = loss_sum.item() if at_check or at_log else None
            if at_check:
                if distributed.broadcast_flag(not math.isfinite(total), d, device):
                    raise Diverged(epoch + 1)
                if bar is not loader:
                    done = step + 1 - start_step
                    bar.set_postfix(
                        {
                            "loss": f"{total / (step + 1):.3f}",
                            "img/s": f"{done * images_per_step / (time.perf_counter() - start - compile_s):.0f}",
                        }
                    )
            if at_log:
                now = time.perf_counter()
                done = step + 1 - logged[0]
                scalars = {"train_loss": (total - logged[1]) / done, "lr": optimizer.param_groups[0]["lr"]}
                if timed:
                    scalars["images_per_s"] = done * images_per_step / (now - logged[2])
                loop.log_steps(scalars, epoch * steps + step + 1)
                logged, timed = (step + 1, total, now), True
            if checkpoints:  # a step boundary: the time, or a waiting signal, may call for a step checkpoint
                checkpoints.after_step(epoch, step + 1, steps, at_check, partial)
    seconds = time.perf_counter() - start
    loss_mean = distributed.all_reduce_sum(loss_sum.clone(), d).item() / (steps * d.world_size)
    steps_timed = steps - start_step - (1 if compile_s else 0)
    images_per_s = steps_timed * images_per_step / (seconds - compile_s) if steps_timed > 0 else 0.0
    return {"lr": lr, "train_loss": loss_mean, "images_per_s": images_per_s, "epoch_time_s": time_before + seconds}


@torch.no_grad()
def evaluate(model, loader, loop: Loop, forward: Callable | None = None) -> dict:
    """Top-1/top-5 error and loss of ``model`` in eval mode; ``forward`` (images -> logits) replaces the eager
    call, e.g. the compiled :attr:`Loop.eval_forward`, which gets a partial last batch padded to the full size
    (every layer normalizes each image on its own in eval mode, so padding changes no other image's logits)."""
    model.eval()
    device = loop.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 correct, top-5 correct, loss sum, count
    count, full_batch = 0, None
    for images, labels in progress(loader, len(loader), "evaluate", loop.show_progress, delay_s=5):
        if loop.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if forward is None:
            with loop.autocast():
                logits = model(images).float()
        else:
            full_batch = full_batch or images.shape[0]
            pad = full_batch - images.shape[0]
            if pad > 0:  # one static shape for the compiled forward: no recompile for the last batch
                images = torch.cat([images, images.new_zeros((pad, *images.shape[1:]))])
            logits = forward(images)[: labels.numel()]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[:3] += torch.stack(
            [
                (top[:, 0] == labels).sum(),
                (top == labels[:, None]).any(1).sum(),
                F.cross_entropy(logits, labels, reduction="sum"),
            ]
        ).double()
        count += labels.numel()
    totals[3] = count
    top1, top5, loss, count = distributed.all_reduce_sum(totals, loop.dist).tolist()
    return {
        "top1_error": 100.0 * (1 - top1 / count),
        "top5_error": 100.0 * (1 - top5 / count),
        "eval_loss": loss / count,
    }


def median_last5(history: list[dict]) -> float | None:
    errors = [row["top1_error"] for row in history[-5:]]
    return statistics.median(errors) if errors else None
