"""One progress bar over a whole sweep, with an ETA from FLOPs (runs differ in cost by 100x,
so a count of runs says little about the time left)."""

import sys
import time
from typing import Optional, TextIO


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class SweepProgress:
    """`update(done_flops, label)` redraws the bar. The rate counts only FLOPs trained since this
    process started (runs finished earlier, or the part of a run resumed, took no time here)."""

    WIDTH = 24

    def __init__(self, total_flops: float, done_flops: float, stream: Optional[TextIO] = None,
                 interval: float = 0.5, plain_interval: float = 30.0):
        self.total = max(float(total_flops), 1.0)
        self.start_done = float(done_flops)
        self.start = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else plain_interval
        self._last_draw = 0.0
        self._drawn = False
        self.done = float(done_flops)
        self.label = ""

    def eta(self) -> Optional[float]:
        trained = self.done - self.start_done
        elapsed = time.monotonic() - self.start
        if trained <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) / (trained / elapsed)

    def line(self) -> str:
        fraction = min(self.done / self.total, 1.0)
        filled = int(round(fraction * self.WIDTH))
        eta = self.eta()
        return (f"sweep [{'#' * filled}{'.' * (self.WIDTH - filled)}] {100 * fraction:3.0f}%  "
                f"{self.done:.2e}/{self.total:.2e} FLOP  {self.label}  "
                f"{duration(time.monotonic() - self.start)} elapsed, ETA {duration(eta) if eta is not None else '?'}")

    def update(self, done_flops: float, label: str, force: bool = False) -> None:
        self.done, self.label = float(done_flops), label
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
            self._drawn = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own above the bar."""
        if self.tty and self._drawn:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self._drawn = False
        self.stream.flush()
        self._last_draw = 0.0

    def close(self) -> None:
        """Leaves the last state on screen (a log already has it: each run's end is drawn)."""
        if self.tty:
            self.update(self.done, self.label, force=True)
            self.stream.write("\n")
            self.stream.flush()
