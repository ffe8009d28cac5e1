"""A run's life on disk, one concept per module:

* ``identity``: the identifying config, its hash, the run's directory and dashboard id;
* ``files``: atomic writes, the run lock, damaged files moved aside, the checkpoint;
* ``record``: the result record, the statuses, the one "is it finished" test, force=true, an attempt's start;
* ``provenance``: git state, the commits that trained a run, the environment;
* ``interrupts``: every terminal signal as an interrupt, recorded before the process ends;
* ``disk_faults``: a full or read-only disk as a one-line error.

``from normbench import runs`` gives the names below.
"""

from .files import (
    CHECKPOINT_KEYS,
    RunLock,
    load_checkpoint,
    read_json,
    read_metrics,
    save_torch,
    set_aside,
    write_bytes,
    write_json,
    write_metrics,
    write_text,
)
from .identity import (
    COLOUR_AUGMENT_KEYS,
    NON_IDENTIFYING,
    identifying_config,
    run_dir,
    run_id,
    run_name,
    sweep_group,
    wandb_id,
)
from .record import (
    FINAL_STATUSES,
    FORCE_SINCE_ENV,
    STATUSES,
    Outcome,
    begin_attempt,
    command_start,
    finished_during_this_command,
    finished_on_main,
    finished_result,
    interruption_message,
    is_finished,
    mark_command_start,
    read_result,
    requeue_count,
    result_record,
    run_state,
    set_aside_finished,
    skip_finished,
    write_result,
)

__all__ = [
    "CHECKPOINT_KEYS",
    "COLOUR_AUGMENT_KEYS",
    "FINAL_STATUSES",
    "FORCE_SINCE_ENV",
    "NON_IDENTIFYING",
    "STATUSES",
    "Outcome",
    "RunLock",
    "begin_attempt",
    "command_start",
    "finished_during_this_command",
    "finished_on_main",
    "finished_result",
    "identifying_config",
    "interruption_message",
    "is_finished",
    "load_checkpoint",
    "mark_command_start",
    "read_json",
    "read_metrics",
    "read_result",
    "requeue_count",
    "result_record",
    "run_dir",
    "run_id",
    "run_name",
    "run_state",
    "save_torch",
    "set_aside",
    "set_aside_finished",
    "skip_finished",
    "sweep_group",
    "wandb_id",
    "write_bytes",
    "write_json",
    "write_metrics",
    "write_result",
    "write_text",
]
