"""Progress without a terminal: plain log lines with step k/N, images/s and ETA, computed here by hand."""

from __future__ import annotations

import logging

import torch

from normbench.progress import LogProgress, progress


class FakeClock:
    """Time as the loop below advances it: 10 s per batch."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _batches(clock, steps: int, images: int):
    for _ in range(steps):
        clock.now += 10.0
        yield torch.zeros(images, 1), torch.zeros(images)


def test_a_line_every_30_seconds_and_at_the_end_with_rate_and_eta(caplog):
    clock = FakeClock()
    bar = LogProgress(_batches(clock, 7, 100), total=7, desc="epoch 1/3", every_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="normbench"):
        seen = sum(1 for _ in bar)
    assert seen == 7
    # 100 images per 10 s step = 10 img/s; after 3 steps (30 s) 4 remain: ETA 40 s; after 6 steps, 1: 10 s.
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 1/3: step 3/7  10 img/s  elapsed 0:30  ETA 0:40",
        "epoch 1/3: step 6/7  10 img/s  elapsed 1:00  ETA 0:10",
        "epoch 1/3: step 7/7  10 img/s  elapsed 1:10  ETA 0:00",
    ]


def test_a_loop_shorter_than_the_delay_prints_nothing_and_postfix_is_carried(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="normbench"):
        list(LogProgress(_batches(clock, 2, 5), total=2, desc="evaluate", delay_s=30, clock=clock))
        assert caplog.records == []
        bar = LogProgress(_batches(clock, 4, 5), total=4, desc="evaluate", every_s=1000, delay_s=30, clock=clock)
        for _ in bar:
            bar.set_postfix({"loss": "1.250", "img/s": "ignored"})
    expected = "evaluate: step 4/4  0.5 img/s  elapsed 0:40  ETA 0:00  loss 1.250"  # 20 images in 40 s
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_without_a_terminal_progress_logs_instead_of_drawing_a_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert isinstance(progress(range(3), 3, "x", enabled=True), LogProgress)
    items = [1, 2]
    assert progress(items, 2, "x", enabled=False) is items
