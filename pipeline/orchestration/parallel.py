"""A stage's independent training runs: taken from the run cache when an interrupted attempt finished them,
else executed (executors.py), each finished run kept in the cache at once, reported on the progress line and
replayed into the stage's tracker in job order.

On a CPU, the small networks of the benchmark use two cores poorly inside one run (per-batch kernels are too
small to split), so independent runs side by side in one-thread processes get 1.9× more work done on 2 cores
(the teachers stage; `python -m benchmarks.parallel_runs` measures it). Every run seeds itself and every
process uses the same number of torch threads (`threads_per_run`), so each run computes exactly what it would
compute alone: results do not depend on `workers` or on the executor (tested).

A job that fails is replayed as a FAILED run and its exception re-raised after the other jobs end; a worker that
dies fails the stage at once (`WorkerDied`), after replaying the runs that finished.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.orchestration.executors import (ExecutorParams, Job, LocalPool, Outcome, RayExecutor, SerialExecutor,
                                              WorkerDied)
from pipeline.orchestration.progress import StageProgress
from pipeline.orchestration.run_cache import RunCache
from pipeline.orchestration.runs import LoadedDataset, RunRecord
from pipeline.tracking.base import Tracker
from pipeline.tracking.recording import RecordedRun, replay


def resolve_workers(setting: str | int, device: torch.device, n_jobs: int, runs_per_gpu: int = 1) -> int:
    """`auto` (or 0): one worker per CPU core on a CPU device, `runs_per_gpu` on a GPU; never more than there
    are jobs."""
    if device.type != "cpu":
        workers = runs_per_gpu
    else:
        workers = (os.cpu_count() or 1) if setting in ("auto", 0) else int(setting)
    return max(1, min(workers, n_jobs))


def make_executor(executor: ExecutorParams, workers: int | str, threads_per_run: int, device: torch.device,
                  n_jobs: int):
    """The executor `executor.kind` names, for `n_jobs` runs on `device`."""
    if executor.kind == "ray":
        return RayExecutor(executor, threads_per_run, device, shared_types=(LoadedDataset,))
    count = resolve_workers(workers, device, n_jobs, executor.runs_per_gpu)
    if count <= 1:
        return SerialExecutor()
    # CUDA cannot be initialised again in a forked child: spawned workers get the dataset sent once
    method = "fork" if device.type == "cpu" else "spawn"
    return LocalPool(count, threads_per_run, method, shared_types=(LoadedDataset,))


def summary(result: Any) -> str:
    """The test metric of a finished run, for its progress line."""
    records = result if isinstance(result, list) else [result]
    for record in records:
        if isinstance(record, RunRecord) and record.test_metrics.get("miou") is not None:
            return f"{record.target}: mIoU {100 * record.test_metrics['miou']:.2f} %"
        if isinstance(record, RunRecord) and record.test_accuracy is not None:
            return f"{record.target}: test {100 * record.test_accuracy:.2f} %"
    return "done"


def _mark_resumed(record: RecordedRun) -> RecordedRun:
    record.tags = {**record.tags, "pipeline.resumed": "true"}
    return record


def run_jobs(jobs: Sequence[Job], tracker: Tracker, executor, *, cache: RunCache | None = None,
             progress: StageProgress | None = None) -> list[Any]:
    """Run `jobs` (each `job.run(tracker) -> result`) with `executor`, results in job order; jobs finished by an
    interrupted attempt come from `cache`. Runs are replayed into `tracker` in job order."""
    ready: dict[int, Outcome] = {}
    to_run = []
    for i, job in enumerate(jobs):
        hit = cache.get(job.name, job.outputs) if cache is not None else None
        if hit is None:
            to_run.append(i)
        else:
            ready[i] = Outcome(i, hit.result, [_mark_resumed(r) for r in hit.runs], None, hit.seconds, cached=True)
    if progress is not None:
        progress.resumed(len(ready))
        progress.start()
    replayed = 0

    def flush() -> None:
        nonlocal replayed
        while replayed < len(jobs) and replayed in ready:
            replay(ready[replayed].runs, tracker)
            replayed += 1

    try:
        flush()
        for outcome in executor.execute(jobs, to_run):
            job = jobs[outcome.index]
            if outcome.error is None and cache is not None:
                cache.put(job.name, outcome.result, outcome.runs, job.outputs, outcome.seconds)
            if progress is not None:
                text = summary(outcome.result) if outcome.error is None else f"FAILED: {outcome.error}"
                progress.finished(job.name, text, outcome.seconds)
            ready[outcome.index] = outcome
            flush()
    except WorkerDied:
        # the finished runs are in the cache; show them in MLflow too, in job order, before failing
        for i in sorted(ready):
            if i >= replayed:
                replay(ready[i].runs, tracker)
        raise
    finally:
        if progress is not None:
            progress.close()
    for i in range(len(jobs)):
        if ready[i].error is not None:
            raise ready[i].error
    return [ready[i].result for i in range(len(jobs))]
