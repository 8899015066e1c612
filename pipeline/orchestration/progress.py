"""What a stage prints while it trains: one line per finished run and a progress bar over the stage's runs,
plus a rate-limited line per long run's epochs.

The line per run (`[3/12] distill/kd/mm/image/seed0  image: test 61.20 %  41.2 s  ETA 4m05s`) is the record that
reads well in `dvc repro` output and in CI logs. The bar is drawn in place with a carriage return only when
the stream is a terminal; otherwise nothing but whole lines is written.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class StageProgress:
    """Runs done out of `total` for one stage, with an ETA from the pace of the runs trained in this attempt."""

    def __init__(self, stage: str, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.stage = stage
        self.total = total
        self.stream = stream or sys.stdout
        self.width = width
        self.done = 0
        self.trained = 0
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar_shown = False

    def resumed(self, count: int) -> None:
        """`count` runs were taken from the run cache (finished by an interrupted attempt)."""
        if count:
            self.done += count
            self._line(f"{self.stage}: {count} of {self.total} runs finished in an interrupted attempt, "
                       f"taken from the run cache; {self.total - self.done} to train")

    def start(self) -> None:
        self._line(f"{self.stage}: {self.total - self.done} runs to train")

    def finished(self, name: str, summary: str, seconds: float) -> None:
        """One finished run: its name, its test metric and its training time."""
        self.done += 1
        self.trained += 1
        remaining = self.total - self.done
        eta = ""
        if remaining and self.trained:
            pace = (time.monotonic() - self.started) / self.trained
            eta = f"  ETA {_duration(pace * remaining)}"
        self._line(f"[{self.done}/{self.total}] {name}  {summary}  {seconds:.1f} s{eta}")

    def close(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False

    def _line(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        if self.tty and self.done < self.total:
            filled = round(self.width * self.done / max(self.total, 1))
            self.stream.write(f"{self.stage} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}")
            self._bar_shown = True
        else:
            self._bar_shown = False
        self.stream.flush()


class EpochProgress:
    """A line `<run>: <phase> epoch e  <metrics>` at most every `interval_s` seconds of one run (0: never)."""

    def __init__(self, name: str, interval_s: float, stream: TextIO | None = None) -> None:
        self.name = name
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self._last = time.monotonic()

    def epoch(self, phase: str, epoch: int, metrics: dict[str, float]) -> None:
        if self.interval_s <= 0 or time.monotonic() - self._last < self.interval_s:
            return
        self._last = time.monotonic()
        shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in ("train_loss", "val_loss", "val_accuracy") if k in metrics)
        self.stream.write(f"  {self.name}: {phase} epoch {epoch + 1}  {shown}\n")
        self.stream.flush()
