"""A stage's independent training runs in worker processes, with results independent of the worker count.

On a CPU, the small networks of the benchmark use two cores poorly inside one run (per-batch kernels
are too small to split), so running independent runs side by side in one-thread processes gets
1.9× more work done on 2 cores (the teachers stage; `python -m benchmarks.parallel_runs` measures it).
Every run seeds itself and every process uses the same number of torch threads (`runtime.threads_per_run`),
so each run computes exactly what it would compute alone: the results do not depend on `runtime.workers`
(tested).

Worker processes are forked, so jobs may be closures over the loaded dataset. They do not talk to
MLflow themselves (a forked sqlite connection is not safe): each records its runs in memory
(`RecordingTracker`) and the parent replays them, in job order, into the stage's tracker. A job that
fails is replayed as a FAILED run and its exception re-raised in the parent after the other jobs end.
CUDA cannot be used in forked children, so on a GPU the runs go one after another in the main process.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline.tracking.base import Tracker

T = TypeVar("T")
Job = Callable[[Tracker], T]


@dataclass
class RecordedRun:
    name: str
    params: dict[str, Any]
    tags: dict[str, str]
    metrics: list[tuple[dict[str, float], int | None]] = field(default_factory=list)
    artifacts: list[tuple[str, bytes]] = field(default_factory=list)
    failed: bool = False


class _RecordingRunLogger:
    def __init__(self, run: RecordedRun) -> None:
        self._run = run

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._run.metrics.append(({k: float(v) for k, v in metrics.items()}, step))

    def log_artifact(self, path: Path) -> None:
        self._run.artifacts.append((Path(path).name, Path(path).read_bytes()))


class RecordingTracker:
    """Keeps everything a job logs, to be replayed into the real tracker by the parent process."""

    def __init__(self) -> None:
        self.runs: list[RecordedRun] = []

    @contextmanager
    def run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[_RecordingRunLogger]:
        record = RecordedRun(name, dict(params), dict(tags))
        self.runs.append(record)
        try:
            yield _RecordingRunLogger(record)
        except BaseException:
            record.failed = True
            raise

    def close(self, succeeded: bool) -> None:
        pass


class _ReplayedFailure(Exception):
    pass


def replay(runs: Sequence[RecordedRun], tracker: Tracker) -> None:
    """Log recorded runs into `tracker`, each ending FINISHED or, if it failed in the worker, FAILED."""
    for record in runs:
        try:
            with tracker.run(record.name, record.params, record.tags) as logger:
                if hasattr(logger, "log_metric_series"):  # one request instead of one per epoch
                    logger.log_metric_series(record.metrics)
                else:
                    for metrics, step in record.metrics:
                        logger.log_metrics(metrics, step=step)
                with tempfile.TemporaryDirectory() as tmp:
                    for name, data in record.artifacts:
                        path = Path(tmp) / name
                        path.write_bytes(data)
                        logger.log_artifact(path)
                if record.failed:
                    raise _ReplayedFailure(record.name)
        except _ReplayedFailure:
            pass


def resolve_workers(setting: str | int, device: torch.device, n_jobs: int) -> int:
    """`auto` (or 0): one worker per CPU core on a CPU device, 1 on a GPU; never more than there are jobs."""
    if device.type != "cpu":
        return 1
    workers = (os.cpu_count() or 1) if setting in ("auto", 0) else int(setting)
    return max(1, min(workers, n_jobs))


_JOBS: Sequence[Job] = ()


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_job(i: int) -> tuple[Any, list[RecordedRun], BaseException | None]:
    recorder = RecordingTracker()
    try:
        return _JOBS[i](recorder), recorder.runs, None
    except BaseException as err:  # returned, not raised: the other jobs and the replay still happen
        return None, recorder.runs, err


def run_jobs(jobs: Sequence[Job], tracker: Tracker, workers: int, threads_per_run: int) -> list[Any]:
    """Run `jobs` (each `job(tracker) -> result`), in `workers` forked processes when > 1; results in job
    order. Runs are logged to `tracker` in job order either way."""
    if workers <= 1 or len(jobs) <= 1:
        return [job(tracker) for job in jobs]
    global _JOBS
    _JOBS = jobs
    outcomes = []
    try:
        context = multiprocessing.get_context("fork")
        # workers are reused across runs: a fresh process per run (maxtasksperchild=1) would give cleaner
        # per-run memory figures but cost 9-18 % more wall time (`python -m benchmarks.parallel_runs`)
        with context.Pool(workers, initializer=_worker_init, initargs=(threads_per_run,)) as pool:
            # replay each job's runs as soon as it (and every earlier job) is done, while later jobs still train
            for outcome in pool.imap(_run_job, range(len(jobs)), chunksize=1):
                replay(outcome[1], tracker)
                outcomes.append(outcome)
    finally:
        _JOBS = ()
    for _, _, error in outcomes:
        if error is not None:
            raise error
    return [result for result, _, _ in outcomes]
