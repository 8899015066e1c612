"""Runs recorded in memory, to be logged later by another process: the stage's worker processes never talk to
MLflow (a forked sqlite connection is not safe), so each job records what it logs (`RecordingTracker`) and the
stage's process replays the records, in job order, into its real tracker (`replay`).

A record keeps the wall-clock times of the run (start, end, each metric), so the replayed MLflow run shows
the run's real duration and timeline rather than the few milliseconds of its replay. Records also travel
through the run cache as JSON (`to_json`, `from_json`).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch (MLflow's unit for run and metric times)."""
    return time.time_ns() // 1_000_000


# non-finite metric values (a diverged loss) as strings: strict JSON has no NaN or Infinity
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode_value(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _decode_value(value: float | str) -> float:
    return _NON_FINITE[value] if isinstance(value, str) else float(value)


@dataclass
class RecordedRun:
    """One run as a job logged it: name, params, tags, per-step metrics, artifacts (name, bytes), whether the
    job's run block raised, and wall-clock times in ms since the epoch (run start and end; one per metrics
    entry)."""

    name: str
    params: dict[str, Any]
    tags: dict[str, str]
    metrics: list[tuple[dict[str, float], int | None]] = field(default_factory=list)
    artifacts: list[tuple[str, bytes]] = field(default_factory=list)
    failed: bool = False
    start_ms: int = 0
    end_ms: int = 0
    metric_times_ms: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        """The record as strict JSON data (artifact bytes in base64, non-finite metric values as strings)."""
        return {"name": self.name, "params": self.params, "tags": self.tags,
                "metrics": [[{k: _encode_value(v) for k, v in values.items()}, step] for values, step in self.metrics],
                "artifacts": [[name, base64.b64encode(data).decode("ascii")] for name, data in self.artifacts],
                "failed": self.failed, "start_ms": self.start_ms, "end_ms": self.end_ms,
                "metric_times_ms": list(self.metric_times_ms)}

    @classmethod
    def from_json(cls, data: dict) -> RecordedRun:
        """The record `to_json` wrote."""
        return cls(name=data["name"], params=dict(data["params"]), tags=dict(data["tags"]),
                   metrics=[({k: _decode_value(v) for k, v in values.items()}, step)
                            for values, step in data["metrics"]],
                   artifacts=[(name, base64.b64decode(text)) for name, text in data["artifacts"]],
                   failed=bool(data["failed"]), start_ms=int(data["start_ms"]), end_ms=int(data["end_ms"]),
                   metric_times_ms=[int(t) for t in data["metric_times_ms"]])


class _RecordingRunLogger:
    def __init__(self, run: RecordedRun) -> None:
        self._run = run

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._run.metrics.append(({k: float(v) for k, v in metrics.items()}, step))
        self._run.metric_times_ms.append(now_ms())

    def log_artifact(self, path: Path) -> None:
        self._run.artifacts.append((Path(path).name, Path(path).read_bytes()))


class RecordingTracker:
    """Keeps everything a job logs, to be replayed into the real tracker by the stage's process."""

    def __init__(self) -> None:
        self.runs: list[RecordedRun] = []

    @contextmanager
    def run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[_RecordingRunLogger]:
        """Context manager yielding a logger; the record is marked failed if the block raises."""
        record = RecordedRun(name, dict(params), dict(tags), start_ms=now_ms())
        self.runs.append(record)
        try:
            yield _RecordingRunLogger(record)
        except BaseException:
            record.failed = True
            raise
        finally:
            record.end_ms = now_ms()

    def replay(self, record: RecordedRun) -> None:
        """Keep an already recorded run (recordings can be nested or forwarded)."""
        self.runs.append(record)

    def close(self, succeeded: bool) -> None:
        pass


def replay(runs: Sequence[RecordedRun], tracker) -> None:
    """Log recorded runs into `tracker`, in order, each as it happened (`tracker.replay`)."""
    for record in runs:
        tracker.replay(record)
