"""torchrun/DDP plumbing. World size 1 (plain `normbench train`) needs none of it: every function is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _export_submitit_env() -> None:
    """Inside a submitit job (SLURM or local executor) with several tasks, export the env:// variables torchrun
    would set. Not a submitit job (submitit's executors always set SUBMITIT_EXECUTOR; without it, e.g. a plain
    `normbench train` inside a SLURM allocation): nothing to export. Inside a submitit job every error is
    raised: a multi-task job that cannot find its rank must not train as several independent single runs."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device_kind: str) -> Dist:
    if "WORLD_SIZE" not in os.environ and ("SUBMITIT_EXECUTOR" in os.environ or "SLURM_JOB_ID" in os.environ):
        _export_submitit_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(tensor)
    return tensor


def average_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Average float buffers (running statistics) over ranks. The running-average update is linear, so
    averaging at the end of an epoch equals what one process emulating all GPUs computes every step (the norm
    layers average their per-GPU chunks the same way). Replaces DDP's broadcast_buffers, which would make every
    GPU use rank 0's statistics (docs/papers.md, traps)."""
    if not d.enabled:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(d.world_size)


def broadcast_flag(flag: bool, d: Dist, device) -> bool:
    """True on every rank if it is True on any (used to stop all ranks on a diverged loss)."""
    if not d.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
