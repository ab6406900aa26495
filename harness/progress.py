"""What long work says while it runs: one line at a time through a `say` callable, and `Progress` for a count of work.

`say(text)` takes one line. Commands pass `to_stderr` (their results stay alone on stdout), training passes
its tracker's `print` (the terminal and the run's train.log), and library functions that would otherwise talk
default to `quiet`. Shared by the evaluation's sampling, `harness dry-run` and `harness flops`.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm import tqdm

Say = Callable[[str], None]


def to_stderr(text: str) -> None:
    """`text` on stderr at once (flushed), so a command's stdout holds only its result."""
    print(text, file=sys.stderr, flush=True)


def quiet(text: str) -> None:
    """Says nothing; `Progress` draws no bar for it either."""


def on_terminal() -> bool:
    """Whether stderr is a terminal: a live bar there, plain lines in logs."""
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    """A duration for people: '42 s', '3m07s', '2h05m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress through `total` units (e.g. samples) of one phase, with its rate and ETA.

    On a terminal a tqdm bar on stderr; otherwise a plain line through `say` every `every_fraction` of the work
    or every `every_s` seconds, whichever comes first. Used as a context manager: leaving it removes the bar (so
    no bar sits at 100% while the next phase runs) and, unless an exception left it, says the phase's total
    time and rate. Reporting reads only the clock: it never changes the work.
    """

    def __init__(self, total: int, what: str, unit: str, say: Say, every_fraction: float = 0.1, every_s: float = 30.0):
        self.total, self.what, self.unit, self.say = total, what, unit, say
        self.every_fraction, self.every_s = every_fraction, every_s
        self.done = self.done_said = 0
        self.start = self.said_at = time.perf_counter()
        self.bar = (tqdm(total=total, desc=what, unit=f" {unit}", leave=False, dynamic_ncols=True)
                    if say is not quiet and on_terminal() else None)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, *_) -> None:
        if self.bar is not None:
            self.bar.close()
        if kind is None:
            elapsed = time.perf_counter() - self.start
            self.say(f"{self.what}: {self.done}/{self.total} {self.unit} in {duration(elapsed)} "
                     f"({self.done / max(elapsed, 1e-9):.3g} {self.unit}/s)")

    def update(self, done: int) -> None:
        """`done` of the `total` units are finished."""
        self.done = done
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        due = done - self.done_said >= self.every_fraction * self.total or now - self.said_at >= self.every_s
        if due and done < self.total:  # the last update is said by the summary on leaving
            rate = done / max(now - self.start, 1e-9)
            eta = duration((self.total - done) / rate) if rate > 0 else "?"
            self.say(f"{self.what}: {done}/{self.total} {self.unit} ({done / self.total:.0%}), "
                     f"{rate:.3g} {self.unit}/s, ETA {eta}")
            self.done_said, self.said_at = done, now
