"""Interrupts: every signal a terminal or a scheduler sends to end a process becomes :class:`Interrupted`, which
the trainer records (status ``interrupted``) and the command reports in one line; never mistaken for a finished
run. From the command's first line (``start_up_interrupts``), while a run trains (``interrupts_raise``), and
held back while an epoch's record is written (``recording_epoch``).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any


class Interrupted(BaseException):
    """A signal asked the run to stop. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    (Hydra's job runner included) swallows it and a sweep stops instead of going on to the next run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Every signal a terminal (Ctrl-C, Ctrl-\\, a closed terminal or dropped ssh session: SIGHUP) or a scheduler
# (SIGTERM, SLURM's --signal USR1/USR2, a CPU-time limit: SIGXCPU) sends to ask a process to end.
INTERRUPT_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGXCPU")
    if hasattr(signal, name)
)
_AT_DEFAULT = (signal.SIG_DFL, signal.default_int_handler)
_before_start: dict[int, Any] = {}  # the handlers start_up_interrupts replaced


def _raise_interrupted(signum, frame):
    if _deferred["depth"]:  # inside a hold (Hydra composing the config): acted on at its end
        signal.signal(signum, _before_start.get(signum, signal.SIG_DFL))  # a second signal stops at once
        _deferred["pending"], _deferred["foreign"] = signum, None
        return
    raise Interrupted(signum)


def start_up_interrupts() -> None:
    """From the command's first line, a signal raises Interrupted (one line, no traceback) instead of killing
    the process in silence or printing a KeyboardInterrupt traceback; handlers set by someone else stay."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in INTERRUPT_SIGNALS:
        previous = signal.getsignal(signum)
        if previous in _AT_DEFAULT:
            _before_start[signum] = previous
            signal.signal(signum, _raise_interrupted)


@contextmanager
def interrupts_raise():
    """Turn INTERRUPT_SIGNALS into `Interrupted` while the run trains. A handler someone else
    installed is left alone: under submitit, SIGUSR2 requeues the job and ends it with sys.exit (a SystemExit
    the run records as interrupted) and SIGTERM is deliberately ignored; a signal the parent set to be ignored
    stays ignored (a non-interactive shell starts `cmd &` with SIGINT ignored). The first signal restores the previous
    handlers, so a second Ctrl-C stops at once (the files on disk stay consistent: every write is atomic)."""
    installed: dict[int, Any] = {}

    def restore(*, to_default: bool) -> None:
        for signum, previous in installed.items():
            if to_default and previous is _raise_interrupted:  # after a first signal: a second one stops at once
                previous = _before_start.get(signum, previous)
            signal.signal(signum, previous)
        installed.clear()

    def handler(signum, frame):
        restore(to_default=True)
        if _deferred["depth"]:  # inside a hold (recording_epoch, holding_to_step_end): acted on at its end
            _deferred["pending"], _deferred["foreign"] = signum, None
            return
        raise Interrupted(signum)

    handler.defers_in_holds = True
    if threading.current_thread() is threading.main_thread():
        for signum in INTERRUPT_SIGNALS:
            if signal.getsignal(signum) in (*_AT_DEFAULT, _raise_interrupted):
                installed[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        # back to the start-up handler, not the default: a signal while the command winds down (the report line,
        # the dashboard's last sync, Hydra's teardown) still gives one true line, never a silent death
        restore(to_default=False)


# A signal that lands while a hold is active waits here: ``pending`` (its number) and ``foreign`` (the handler
# someone else installed, e.g. submitit's requeue, to call once the hold ends; None: raise Interrupted).
_deferred: dict[str, Any] = {"depth": 0, "pending": None, "foreign": None}


def held_signal() -> int | None:
    """The signal waiting for the end of a hold (a training step, an epoch's record), or None."""
    return _deferred["pending"]


def deliver_held() -> None:
    """Act on the waiting signal now: raise Interrupted, or call the foreign handler it was meant for (submitit's
    SIGUSR2 handler requeues the job and exits; its SIGTERM handler only logs, and training goes on)."""
    signum, foreign = _deferred["pending"], _deferred["foreign"]
    _deferred["pending"] = _deferred["foreign"] = None
    if signum is None:
        return
    if foreign is None:
        raise Interrupted(signum)
    foreign(signum, None)


@contextmanager
def _holding():
    _deferred["depth"] += 1
    try:
        yield
    except BaseException:  # an error inside (a failed write) goes on as it is: the waiting signal is dropped with
        _deferred["depth"] -= 1  # it, so it can neither replace the error nor reach the next run
        if not _deferred["depth"]:
            _deferred["pending"] = _deferred["foreign"] = None
        raise
    _deferred["depth"] -= 1
    if not _deferred["depth"]:
        deliver_held()


_library_hold = {"active": False}


@contextmanager
def holding_through_start_up():
    """Hydra's import (omegaconf building its structured configs) and Hydra composing the config are library code
    that does not survive an exception raised in the middle of it (omegaconf's flag restore then fails with an
    AttributeError that Hydra prints as a traceback, and the interrupt is lost): a start-up signal waits until
    the task function begins (`start_up_done`), or until this block ends if it never does (an error, a --cfg
    print, a sweep with nothing to train)."""
    _library_hold["active"] = True
    with _holding():
        try:
            yield
        finally:
            if _library_hold["active"]:
                _library_hold["active"] = False
            else:
                _deferred["depth"] += 1  # start_up_done left the hold early: _holding's own exit balances it


def start_up_done() -> None:
    """The task function has begun: a signal held since start-up is raised here, in normbench's code."""
    if _library_hold["active"]:
        _library_hold["active"] = False
        _deferred["depth"] -= 1
        if not _deferred["depth"]:
            deliver_held()


@contextmanager
def recording_epoch():
    """The epoch's record -- checkpoint, then metrics.jsonl -- is written whole: a signal of
    `interrupts_raise` that lands inside is raised at the end, so an interrupted run's files always agree on
    how many epochs it finished (a second signal still stops at once: the first restored the old handlers)."""
    with _holding():
        yield


@contextmanager
def holding_to_step_end():
    """While training steps run (step checkpoints on): every interrupt signal waits for the end of the step in
    progress, so the loop can write a step checkpoint first (it polls `held_signal` and calls `deliver_held`).
    That includes a handler someone else installed (submitit's requeue on SIGUSR2): it is called once the
    checkpoint is on disk. A second signal acts at once, as without the hold (every write is atomic)."""
    wrapped: dict[int, Any] = {}

    def holder_for(foreign):
        def holder(signum, frame):
            signal.signal(signum, foreign)  # a second signal goes straight to it
            wrapped.pop(signum, None)
            _deferred["pending"], _deferred["foreign"] = signum, foreign

        return holder

    if threading.current_thread() is threading.main_thread():
        for signum in INTERRUPT_SIGNALS:
            current = signal.getsignal(signum)
            if callable(current) and current is not _raise_interrupted and current is not signal.default_int_handler:
                if getattr(current, "defers_in_holds", False):
                    continue  # interrupts_raise's: it defers by itself while the hold is active
                wrapped[signum] = current
                signal.signal(signum, holder_for(current))
    try:
        with _holding():
            yield
    finally:
        for signum, foreign in wrapped.items():
            signal.signal(signum, foreign)


def interruption_name(err: BaseException) -> str:
    if isinstance(err, Interrupted):
        return str(err)
    return type(err).__name__  # KeyboardInterrupt, SystemExit (submitit's requeue)


def interruption_exit_code(err: BaseException) -> int:
    if isinstance(err, Interrupted):
        return 128 + err.signum
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    code = getattr(err, "code", 1)
    return code if isinstance(code, int) and code != 0 else 1
