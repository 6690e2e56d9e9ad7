"""Progress of long work on stderr: a bar on a terminal, a line every few seconds elsewhere.

``progress`` (the argument of ``score_layer``, ``prune``, ``finetune``...): None (the default: a bar on a
terminal, periodic lines where stderr is not one, as in a log or a Jupyter notebook; the environment
variable ``CARFAST_PROGRESS=0`` turns both off), True (the same, whatever the variable says), False
(nothing), or a callable ``(done, total)`` called after every update.
"""
from __future__ import annotations

import os
import sys
import time

__all__ = ["Progress", "LINE_SECONDS"]

#: seconds between two progress lines outside a terminal (the first comes after as long)
LINE_SECONDS = 10.0


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress of ``total`` units of work (None: unknown) named ``label``; ``update(n)`` after each piece.

    The time left is ``estimate()`` (seconds, or None while it cannot tell) when given: the caller's model
    of what remains, for work whose pieces differ in cost; else elapsed time scaled by the share left.
    """

    def __init__(self, progress, total: int | None, label: str, unit: str = "pairs", estimate=None):
        self.callback = progress if callable(progress) else None
        on = (os.environ.get("CARFAST_PROGRESS", "1") != "0") if progress is None else \
            bool(progress) and self.callback is None
        self.mode = None if not on else ("bar" if sys.stderr.isatty() else "lines")
        self.total, self.label, self.unit, self.done = total, label, unit, 0
        self.estimate = estimate
        self.start = self.last = time.perf_counter()
        self.lines = 0
        self.finished_shown = False

    def _timing(self, now: float) -> str:
        elapsed = now - self.start
        text = f"{_clock(elapsed)} elapsed"
        if self.total and 0 < self.done < self.total:
            left = elapsed * (self.total - self.done) / self.done if self.estimate is None else self.estimate()
            if left is not None:
                text += f", ~{_clock(left)} left"
        return text

    def update(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)
        if self.mode is None:
            return
        now = time.perf_counter()
        finished = bool(self.total) and self.done >= self.total
        if finished and self.finished_shown:
            return                       # (an empty update after the end would repeat the last line)
        self.finished_shown = finished
        rate = self.done / max(now - self.start, 1e-9)
        if self.mode == "bar" and (now - self.last > 0.25 or finished):
            self.last = now
            if self.total:
                frac = min(self.done / self.total, 1.0)
                sys.stderr.write(f"\r{self.label} [{'#' * int(30 * frac):<30}] {100 * frac:5.1f} %  "
                                 f"{rate:,.1f} {self.unit}/s  {self._timing(now)}  ")
            else:
                sys.stderr.write(f"\r{self.label} {self.done:,} {self.unit}  {rate:,.1f} {self.unit}/s  "
                                 f"{self._timing(now)}  ")
            sys.stderr.flush()
        elif self.mode == "lines" and (now - self.last >= LINE_SECONDS or (finished and self.lines)):
            self.last = now
            self.lines += 1
            of = f"/{self.total:,} {self.unit} ({100 * min(self.done / self.total, 1.0):.1f} %)" if self.total \
                else f" {self.unit}"
            sys.stderr.write(f"carfast: {self.label} {self.done:,}{of}, {self._timing(now)}\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.mode == "bar":
            sys.stderr.write("\n")
            sys.stderr.flush()
