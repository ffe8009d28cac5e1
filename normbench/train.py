"""normbench train: one training run, the unit every sweep and table rests on.

    normbench train [hydra overrides]            e.g. normbench train norm=gn per_gpu_batch=2
    torchrun --nproc_per_node=8 -m normbench train model=resnet50 data=imagenet

A step processes `gpus x per_gpu_batch` images. Batch-dependent norm layers see the statistics of
`per_gpu_batch` images, as on the papers' GPUs: on one device the layers emulate the GPUs (their
`per_gpu_batch` option), under torchrun with world size w each process handles gpus / w of them.
The run lives in results_dir/experiment/<name>-<hash>/; rerunning the same command resumes it, and a
completed (or diverged) run is not trained again.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normbench import bn_eval, checkpoints, distributed, runs
from normbench.config import BatchGeometry, ConfigError, validate
from normbench.data import DataBundle, DataError, build_data
from normbench.fast import autocast, fast_settings, make_steps, resolve_device
from normbench.loop import Diverged, Loop, evaluate, median_last5, train_one_epoch
from normbench.models import build_model
from normbench.norms import NormConfigError, NormSpec, reads_running_stats_in_training
from normbench.optim import build_optimizer, build_scheduler, learning_rate
from normbench.paths import CONFIG_DIR
from normbench.runs import disk_faults, interrupts, provenance
from normbench.tracking import Tracker

log = logging.getLogger("normbench")


# ---- one run ------------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """Everything one run is made of, built (and validated) before a file is written."""

    config: dict  # the resolved config, plain containers: the only config the trainer reads
    directory: Path
    dist: distributed.Dist
    device: torch.device
    fast: dict  # the resolved speed switches (normbench.fast.fast_settings)
    geometry: BatchGeometry
    norm: NormSpec
    data: DataBundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def train(cfg: DictConfig | dict) -> dict:
    """Train (or resume, or skip) the run `cfg` describes; returns its result, with `outcome` saying which of
    completed / skipped / resumed / diverged happened (for the sweep summary). A failure raises after recording
    `failed`; an interrupt raises after recording `interrupted` (see normbench.runs for the statuses)."""
    try:
        config = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:  # a bad interpolation, e.g. ${gpus_for:64,3}
        raise ConfigError(str(err).splitlines()[0]) from None
    validate(config)
    device = resolve_device(config["device"])
    d = distributed.setup(device.type)
    geometry = BatchGeometry.of(config, d.world_size)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    fast = fast_settings(config, device)
    # The resolved precision and layout are what the run computes with: recorded, and the precision hashed.
    config["fast"].update({k: fast[k] for k in ("amp", "channels_last", "compile", "cuda_graphs")})
    directory = runs.run_dir(config)
    force = bool(config.get("force", False))
    if d.is_main:
        disk_faults.check_writable(Path(config["results_dir"]))
    if finished := runs.skip_finished(directory, d, device, force):
        return finished

    torch.backends.cudnn.benchmark = fast["cudnn_benchmark"]
    torch.manual_seed(config["seed"])
    try:  # everything a bad config can break, before a single file is written
        data = build_data(
            config["data"],
            global_batch=geometry.images_per_step,
            rank=d.rank,
            world_size=d.world_size,
            seed=config["seed"],
            device=device,
        )
        norm = NormSpec.from_config(config)
        model = build_model(config["model"], norm.layer(), data.num_classes, data.in_channels)
        model = norm.for_processes(model, d.enabled)
    except (NormConfigError, DataError, ValueError) as err:
        raise ConfigError(str(err)) from None
    model.to(device, memory_format=torch.channels_last if fast["channels_last"] else torch.preserve_format)
    optimizer = build_optimizer(model, config)
    run = RunContext(
        config, directory, d, device, fast, geometry, norm, data, model, optimizer,
        build_scheduler(optimizer, config, len(data.train)),
    )  # fmt: skip

    lock = runs.RunLock(directory) if d.is_main else None
    busy = not lock.acquire() if lock else False
    if distributed.broadcast_flag(busy, d, device):
        log.info("skip %s: another process is training it", directory)
        return {"status": "running", "outcome": "busy", "run_dir": str(directory)}
    try:
        if d.is_main:
            runs.begin_attempt(directory)  # stale temporaries and an earlier attempt's result.json
        if finished := runs.skip_finished(directory, d, device, force, quiet=True):  # finished by another worker?
            return finished
        if force and d.is_main and runs.finished_result(directory):
            aside = runs.set_aside_finished(directory)
            log.info("force=true: the finished run was moved to %s; training it again", aside)
        return _run(run)
    finally:
        if lock:
            lock.release()


def _run(ctx: RunContext) -> dict:
    config, directory, d, device, fast = ctx.config, ctx.directory, ctx.dist, ctx.device, ctx.fast
    model, optimizer, scheduler, data = ctx.model, ctx.optimizer, ctx.scheduler, ctx.data
    epochs = config["epochs"]
    started = time.perf_counter()
    checkpoint_path = directory / "checkpoint.pt"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(fast["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=fast["amp"] == "fp16")
    start_epoch, start_step, history, wall_before, resumes = 0, 0, [], 0.0, 0
    resume_partial = None  # a step checkpoint's position and partial metrics, for the first epoch trained
    state = runs.load_checkpoint(checkpoint_path, device) if d.is_main or checkpoint_path.exists() else None
    if distributed.broadcast_flag(state is None, d, device):
        state = None  # every rank starts from the same place (rank 0 may have set a damaged file aside)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, wall_before = state["epoch"], int(state.get("step", 0)), state["wall_time_s"]
        history, resumes = list(state["history"]), state.get("resumes", 0) + 1
        if start_step:
            resume_partial = {"step": start_step, **_rank_state_of(state, d, model, device)}
        where = (
            f"epoch {start_epoch + 1} step {start_step} of {len(data.train)}" if start_step else f"epoch {start_epoch}"
        )
        when = checkpoints.written_at(state["written_at"]) if "written_at" in state else "at an unknown time"
        log.info("resume %s from %s (checkpoint written %s)", directory, where, when)
    log.info("%s", ctx.geometry.describe())
    outcome = "resumed" if state else "completed"
    code_history = provenance.CodeHistory(state, start_epoch, start_step)  # every commit that trains part of it
    environment = None
    if d.is_main:
        try:
            runs.write_text(directory / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
            runs.write_text(directory / "overrides.yaml", OmegaConf.to_yaml(_command_line_overrides()))
            environment = {**provenance.environment(str(device)), "fast": fast, "world_size": d.world_size}
            runs.write_json(directory / "env.json", environment)
            runs.write_metrics(directory / "metrics.jsonl", history)  # rebuilt from the checkpoint: never damaged
        except OSError as err:  # a disk that fills (or turns read-only) between the start-up check and here
            problem = disk_faults.describe_environment_error(err, directory)
            if problem is None:
                raise
            raise disk_faults.RunEnvironmentError(problem) from err
    train_model = model
    if d.enabled:  # per-GPU statistics: never broadcast rank 0's buffers (see distributed.average_buffers)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    forward_loss, eval_forward = make_steps(train_model, model, fast, lambda: autocast(device, amp_dtype))

    def checkpoint_state(epochs_done: int, **more) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epochs_done,
            "history": list(history),
            "code_history": code_history.through(epochs_done),
            "resumes": resumes,
            "wall_time_s": wall_before + time.perf_counter() - started,
            "written_at": time.time(),
            **more,
        }

    def save_checkpoint(state: dict) -> int:
        runs.save_torch(checkpoint_path, state)
        return checkpoint_path.stat().st_size

    def save_step_checkpoint(epoch: int, steps_done: int, partial) -> int:
        ranks = checkpoints.gather_rank_states(checkpoints.rank_state(model, partial()), d)
        if not d.is_main:
            return 0
        more = {"step": steps_done, "ranks": ranks, "world_size": d.world_size, "partial_epoch_code": code_history.now}
        return save_checkpoint(checkpoint_state(epoch, **more))

    step_checkpoints = checkpoints.StepCheckpoints(
        config["checkpoint"]["every_minutes"], save_step_checkpoint, d, device
    )
    loop = Loop(
        device=device,
        dist=d,
        raw_model=model,
        channels_last=fast["channels_last"],
        sync_buffers_every_step=reads_running_stats_in_training(model) and d.enabled,
        show_progress=d.is_main and config["logger"]["progress"],
        amp_dtype=amp_dtype,
        scaler=scaler,
        images_per_step=ctx.geometry.images_per_step,
        epochs=epochs,
        check_every=config["logger"]["check_every"],
        every_steps=config["logger"]["every_steps"],
        forward_loss=forward_loss,
        eval_forward=eval_forward,
        cuda_graphs=fast["cuda_graphs"],
        compile_pending=fast["compile"],
        step_checkpoints=step_checkpoints,
    )

    run, by_eval = runs.Outcome(outcome), None
    with (
        interrupts.interrupts_raise(),
        Tracker(
            config,
            directory,
            run_id=runs.wandb_id(config),
            enabled=d.is_main,
            environment=environment,
            resume_step=start_epoch * len(data.train) + start_step,
            history=list(history),
            steps_per_epoch=len(data.train),
        ) as tracker,
    ):
        loop.log_steps = tracker.log_steps if d.is_main else None  # fmt: skip
        try:
            for epoch in range(start_epoch, epochs):
                resume, resume_partial = resume_partial, None
                row = train_one_epoch(train_model, data.train, optimizer, scheduler, epoch, loop, resume)
                distributed.average_buffers(model, d)
                if ctx.norm.before_evaluation(model, lambda: (x for x, _ in data.train)):
                    distributed.average_buffers(model, d)  # every rank evaluates with the same statistics
                row = {"epoch": epoch + 1, **row, **evaluate(model, data.eval, loop, loop.eval_forward)}
                row.update(ctx.norm.epoch_scalars(model))  # SN's importance weights as curves
                # from here to metrics.jsonl a signal waits: history, checkpoint and metrics agree on the epochs
                with interrupts.recording_epoch():
                    log.info(
                        "epoch %d/%d  loss %.4f  top-1 err %.2f%%  top-5 err %.2f%%  %.0f img/s  %.1fs",
                        epoch + 1,
                        epochs,
                        row["train_loss"],
                        row["top1_error"],
                        row["top5_error"],
                        row["images_per_s"],
                        row["epoch_time_s"],
                    )
                    if d.is_main:
                        tracker.log_epoch(row, step=(epoch + 1) * len(data.train))
                        saving = time.perf_counter()
                        state = checkpoint_state(epoch + 1)
                        state["history"].append(row)
                        size = save_checkpoint(state)
                        log.info("checkpoint: epoch %d (%.1f MB in %.2fs)", epoch + 1, size / 1e6,
                                 time.perf_counter() - saving)  # fmt: skip
                    history.append(row)  # only once its checkpoint is on disk: a failed write does not count it
                    step_checkpoints.epoch_checkpoint_written()
                    if d.is_main:
                        runs.write_metrics(directory / "metrics.jsonl", history)
            by_eval = _final_evaluations(ctx, loop, history)  # bn_eval: after the last epoch
        except Diverged as stop:
            run.end("diverged", diverged_epoch=stop.args[0])
            log.warning("run diverged: non-finite training loss in epoch %d; recorded as a result", stop.args[0])
        except Exception as err:  # a crash is recorded, then raised: the sweep counts it, a single run exits 1
            problem = disk_faults.describe_environment_error(err, directory)
            run.end("failed", error=problem or f"{type(err).__name__}: {err}")
            if problem:
                raise disk_faults.RunEnvironmentError(problem) from err
            raise
        except BaseException as stop:  # Interrupted (a signal), KeyboardInterrupt, SystemExit (submitit requeue)
            run.end("interrupted", interrupted_by=interrupts.interruption_name(stop))
            at = step_checkpoints.written  # a step checkpoint of the epoch in progress, or None
            log.warning(
                "interrupted by %s after %d of %d epochs%s; rerun the same command to resume from %s",
                run.interrupted_by,
                len(history),
                epochs,
                f" and {at[1]} steps of epoch {at[0] + 1} (a step checkpoint holds them)" if at else "",
                f"epoch {at[0] + 1} step {at[1]}" if at else f"epoch {len(history)}",
            )
            raise
        finally:
            if run.status == "completed" and len(history) != epochs:  # never claim what did not run
                run.end("failed", error=f"ended after {len(history)} of {epochs} epochs")
            result = _result(ctx, run, history, resumes, wall_before + time.perf_counter() - started)
            result["code_history"] = code_history.through(len(history))
            if by_eval is not None:
                result["top1_error_by_eval"] = by_eval
            if d.is_main:
                try:
                    runs.write_result(directory, result)
                except OSError as err:  # the disk that stopped the run may not take its record either
                    log.warning("could not write %s: %s", directory / "result.json", err)
                tracker.summary(
                    {k: v for k, v in result.items() if k.startswith("top")}, len(history) * len(data.train)
                )
    log.info(
        "%s: %s  top-1 err final %s  median(last 5) %s",
        directory,
        run.status,
        result["top1_error_final"],
        result["top1_error_median_last5"],
    )
    return {**result, "outcome": run.outcome}


def _rank_state_of(state: dict, d: distributed.Dist, model, device) -> dict:
    """This rank's part of a step checkpoint (its running statistics, partial loss, random states), loaded into
    ``model`` and the generators; returns its partial metrics."""
    ranks = state.get("ranks") or []
    if len(ranks) != d.world_size:
        log.warning(
            "the step checkpoint was written by %d processes and this run has %d: every process continues with "
            "rank 0's running statistics and random states (the result is not bit-identical to one uninterrupted "
            "run)",
            len(ranks),
            d.world_size,
        )
    return checkpoints.restore_rank_state(model, ranks[d.rank] if len(ranks) == d.world_size else ranks[0], device)


def _final_evaluations(ctx: RunContext, loop: Loop, history) -> dict | None:
    """``top1_error_by_eval`` of the final model (normbench.bn_eval): ema / precise_bn / batch_stats; None
    when ``bn_eval.enabled`` is false."""
    settings = ctx.config["bn_eval"]
    if not settings["enabled"] or not history:
        return None

    def forward(m, images):  # a re-estimation batch, run as training runs it
        if loop.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with loop.autocast():
            return m(images)

    started = time.perf_counter()
    by_eval = bn_eval.evaluations(
        ctx.model,
        ctx.data.train,
        ctx.data.eval,
        lambda m, loader: evaluate(m, loader, loop),
        per_gpu_batch=ctx.geometry.per_gpu_batch,
        precise_bn_images=settings["precise_bn_images"],
        forward=forward,
        dist=loop.dist,
        ema=history[-1]["top1_error"],
        group_batch=ctx.geometry.images_per_process,  # the training step's, not data.eval_batch
    )
    log.info(
        "top-1 err of the final model by evaluation: %s (%.1fs)",
        "  ".join(f"{k} {v:.2f}%" for k, v in by_eval.items()),
        time.perf_counter() - started,
    )
    return by_eval


def _result(ctx: RunContext, run: runs.Outcome, history, resumes, wall_time_s) -> dict:
    """The result record (normbench.runs.result_record) with what only the trainer knows."""
    return runs.result_record(
        ctx.config,
        run,
        history,
        resumes,
        wall_time_s,
        metric=median_last5(history),
        norm=ctx.norm.label,
        norm_options=ctx.norm.options,
        lr=learning_rate(ctx.config),
        **ctx.norm.recorded(ctx.model),
    )


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def one_line(err: BaseException) -> str:
    """The user-facing line of an error (a DataLoader worker wraps the original in its traceback text)."""
    text = str(err)
    for marker in ("DataError: ", "ConfigError: "):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    return " ".join(text.split())


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> dict:
    try:
        interrupts.start_up_done()  # a signal held while Hydra composed the config is raised here
        return train(cfg)
    except (ConfigError, DataError, disk_faults.RunEnvironmentError) as err:
        if _in_multirun():
            raise  # the sweep records it as failed and goes on
        print(f"normbench train: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 1)
    except (interrupts.Interrupted, KeyboardInterrupt) as stop:  # SystemExit (submitit's requeue) passes untouched
        print(f"normbench train: {runs.interruption_message(stop)}", file=sys.stderr, flush=True)
        sys.exit(interrupts.interruption_exit_code(stop))
    finally:
        distributed.teardown()


if __name__ == "__main__":  # the entry is the command (normbench/__main__.py), which validates first
    sys.exit("normbench.train is not an entry point: run `python -m normbench train` (torchrun: -m normbench train)")
