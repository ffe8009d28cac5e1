"""Progress of a run: a bar per epoch on a terminal, a plain log line every LOG_EVERY_S elsewhere (log files,
submitit, CI), with images/s and ETA."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("normbench")

LOG_EVERY_S = 30.0  # without a terminal: seconds between progress lines


class LogProgress:
    """Progress for logs (no terminal: a file, CI, submitit): a plain log line every `every_s` seconds and one
    at the end, with step k/N, images/s and ETA -- instead of a tqdm bar that a log shows frozen at 0/N.
    Nothing is printed for a loop that ends within `delay_s`. Images are counted from each batch's first
    tensor. `set_postfix` (tqdm's) adds its values to the next line."""

    def __init__(
        self, iterable, total: int, desc: str, every_s: float = LOG_EVERY_S, delay_s: float = 0.0, clock=time.monotonic
    ):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.every_s, self.delay_s, self.clock = every_s, delay_s, clock
        self.postfix: dict = {}

    def set_postfix(self, values: dict) -> None:
        self.postfix = {k: v for k, v in values.items() if k != "img/s"}  # images/s is measured here

    def _line(self, step: int, images: int, elapsed: float) -> str:
        rate = images / elapsed if elapsed > 0 else 0.0
        digits = 0 if rate >= 10 else 1
        eta = elapsed / step * (self.total - step) if step else 0.0
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        return (
            f"{self.desc}: step {step}/{self.total}  {rate:.{digits}f} img/s  "
            f"elapsed {_clock_time(elapsed)}  ETA {_clock_time(eta)}{extra}"
        )

    def __iter__(self):
        start = last = self.clock()
        step = images = 0
        for batch in self.iterable:
            yield batch
            step += 1
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            images += len(first) if hasattr(first, "__len__") else 1
            now = self.clock()
            if now - last >= self.every_s and now - start >= self.delay_s and step < self.total:
                log.info(self._line(step, images, now - start))
                last = now
        if self.clock() - start >= self.delay_s:
            log.info(self._line(step, images, self.clock() - start))

    def __len__(self) -> int:
        return self.total


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress(iterable, total: int, desc: str, enabled: bool, delay_s: float = 0.0):
    """Progress of a loop of `total` steps: a tqdm bar with images/s and ETA on a terminal, log lines
    otherwise (LogProgress). `delay_s`: show nothing for a loop that finishes sooner (evaluation)."""
    if not enabled:
        return iterable
    if not sys.stderr.isatty():
        return LogProgress(iterable, total, desc, delay_s=delay_s)
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit="step",
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
        delay=delay_s,
        postfix={"img/s": "-"},
    )
