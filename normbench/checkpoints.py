"""Step checkpoints: a run killed inside an epoch loses at most ``checkpoint.every_minutes`` of training.

Every ``every_minutes`` (and when an interrupt signal arrives, once the step in progress ends) the trainer writes
``checkpoint.pt`` at a step boundary: the epoch-end contents plus the step reached, the epoch's partial metrics
and every random state. The data order and the augmentation are functions of (seed, epoch, position) in every
loader (normbench.data.common), so the step is all a loader needs to continue with the same batches. Under
torchrun each rank's running statistics, partial loss and random states are gathered into the one file (the
per-GPU statistics differ between ranks until the epoch-end average), and every rank resumes at the same step.
It is the same file as the epoch-end checkpoint, replaced atomically: the previous one stays valid until the new
one is whole, and no old step checkpoint is left behind.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as torch_dist

from normbench import distributed
from normbench.runs import interrupts

log = logging.getLogger("normbench")

COST_WARNING_FRACTION = 0.05  # a checkpoint that takes more of its interval than this says so, once


def random_states() -> dict:
    """Every random generator a step could read: torch CPU (and CUDA), numpy, Python; stored in tensors and plain
    containers, so that the checkpoint still loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },  # fmt: skip
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_state(model: torch.nn.Module, partial: dict) -> dict:
    """What differs between ranks inside an epoch: buffers (per-GPU running statistics), the partial loss sum and
    the random states. Tensors on the CPU, so that rank 0 can keep every rank's."""
    return {
        "buffers": {name: b.detach().cpu().clone() for name, b in model.named_buffers()},
        "partial": {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in partial.items()},
        "random": random_states(),
    }


def gather_rank_states(mine: dict, d: distributed.Dist) -> list[dict] | None:
    """Every rank's `rank_state` on rank 0 (None elsewhere); world size 1: ``[mine]``."""
    if not d.enabled:
        return [mine]
    gathered = [None] * d.world_size if d.is_main else None
    torch_dist.gather_object(mine, gathered, dst=0)
    return gathered


def restore_rank_state(model: torch.nn.Module, state: dict, device) -> dict:
    """Load this rank's buffers and random states; returns its partial metrics, tensors on ``device``."""
    model.load_state_dict(state["buffers"], strict=False)  # buffers only: the parameters came with the model's
    set_random_states(state["random"])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in state["partial"].items()}


class StepCheckpoints:
    """When to write a step checkpoint, and what it costs. ``after_step`` runs at every step boundary: it writes
    when ``every_minutes`` have passed since the last checkpoint of any kind, or when a signal waits (see
    interrupts.holding_to_step_end), then delivers that signal. Under torchrun the ranks decide together, at the
    divergence check's steps (one small all-reduce, where the loop already waits for the device)."""

    def __init__(self, every_minutes: float, save: Callable[[int, int, Callable[[], dict]], int], d, device):
        self.interval_s = 60.0 * float(every_minutes)
        self.save = save  # (epoch, steps done, partial metrics) -> bytes written (rank 0; 0 elsewhere)
        self.dist, self.device = d, device
        self.last = time.monotonic()
        self.warned = False
        self.written: tuple[int, int] | None = None  # (epoch, steps done) of the last step checkpoint this epoch

    def epoch_started(self, epoch: int, start_step: int) -> None:
        self.written = (epoch, start_step) if start_step else None

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def epoch_checkpoint_written(self) -> None:
        self.last, self.written = time.monotonic(), None

    def after_step(self, epoch: int, steps_done: int, steps: int, at_check: bool, partial: Callable[[], dict]) -> None:
        signum = interrupts.held_signal()
        due = steps_done < steps and time.monotonic() - self.last >= self.interval_s  # the epoch end writes its own
        if self.dist.enabled:
            if not at_check:
                return
            agreed = torch.tensor([float(signum or 0), float(due)], device=self.device)
            torch_dist.all_reduce(agreed, op=torch_dist.ReduceOp.MAX)
            signal_anywhere, due = (int(v) for v in agreed.tolist())  # one read of the device
            if signal_anywhere and signum is None:  # torchrun signals every rank, not at the same step
                signum = signal_anywhere
        if not (signum or due):
            return
        started = time.perf_counter()
        size = self.save(epoch, steps_done, partial)
        seconds = time.perf_counter() - started
        self.last, self.written = time.monotonic(), (epoch, steps_done)
        if size:
            log.info(
                "step checkpoint: epoch %d step %d of %d (%.1f MB in %.2fs)%s",
                epoch + 1,
                steps_done,
                steps,
                size / 1e6,
                seconds,
                f", for {signal.Signals(signum).name}" if signum else "",
            )
            if not self.warned and seconds > COST_WARNING_FRACTION * self.interval_s:
                self.warned = True
                log.warning(
                    "a step checkpoint takes %.2gs, %.0f%% of checkpoint.every_minutes=%g: raise "
                    "checkpoint.every_minutes to spend less of the run writing them",
                    seconds,
                    100 * seconds / self.interval_s,
                    self.interval_s / 60,
                )
        if not signum:  # a signal that came during this write waits for the next step boundary: its own checkpoint
            return
        if interrupts.held_signal() is None:  # another rank's signal: every rank stops at this step
            raise interrupts.Interrupted(signum)
        interrupts.deliver_held()


def written_at(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
