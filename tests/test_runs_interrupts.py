"""Signals turned into `Interrupted` while a run trains, and the epoch record they cannot cut in half.
Real signals, sent by this process to itself (the end-to-end fault tests are in tests/test_faults.py)."""

from __future__ import annotations

import os
import signal

import pytest

from normbench.runs.interrupts import Interrupted, interrupts_raise, recording_epoch


@pytest.fixture(autouse=True)
def default_usr1():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_a_signal_raises_interrupted_at_once():
    steps = []
    with pytest.raises(Interrupted) as caught, interrupts_raise():
        steps.append("before")
        os.kill(os.getpid(), signal.SIGUSR1)
        steps.append("after")  # never reached: Python runs the handler before the next bytecode
    assert steps == ["before"] and caught.value.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the previous handler is back


def test_a_signal_inside_the_epoch_record_waits_for_its_end():
    steps = []
    with pytest.raises(Interrupted) as caught, interrupts_raise():
        with recording_epoch():
            steps.append("checkpoint")
            os.kill(os.getpid(), signal.SIGUSR1)
            steps.append("metrics")  # still written: the files agree on the epochs finished
        steps.append("next epoch")  # never reached
    assert steps == ["checkpoint", "metrics"] and caught.value.signum == signal.SIGUSR1


def test_an_error_inside_the_epoch_record_is_not_replaced_by_the_signal():
    with pytest.raises(OSError, match="disk full"), interrupts_raise():
        with recording_epoch():
            os.kill(os.getpid(), signal.SIGUSR1)
            raise OSError("disk full")
    with interrupts_raise():  # nothing pending is left over for the next run
        with recording_epoch():
            pass


def test_an_ignored_signal_stays_ignored():
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with interrupts_raise():
        os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_after_the_run_the_start_up_handler_is_back_and_after_a_signal_the_default(monkeypatch):
    """A run that ends in peace leaves the command's start-up handler in place (a signal while the command
    winds down still gives one line, never a silent death, the failure CI met); after a first signal the
    default is back, so a second one stops at once."""
    from normbench.runs import interrupts

    monkeypatch.setattr(interrupts, "_before_start", {signal.SIGUSR1: signal.SIG_DFL})
    signal.signal(signal.SIGUSR1, interrupts._raise_interrupted)  # as start_up_interrupts leaves it
    with interrupts_raise():
        pass
    assert signal.getsignal(signal.SIGUSR1) is interrupts._raise_interrupted
    with pytest.raises(Interrupted), interrupts_raise():
        os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
