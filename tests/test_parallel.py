"""Runs in worker processes compute exactly what they compute in the main process, and are logged alike."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.data.catalog import dataset_spec
from pipeline.orchestration.config import parse_params
from pipeline.orchestration import executors
from pipeline.orchestration.executors import Job, LocalPool
from pipeline.orchestration.parallel import resolve_workers, run_jobs
from pipeline.tracking.recording import RecordingTracker
from pipeline.orchestration.runs import LoadedDataset
from pipeline.orchestration.teachers import train_teachers
from tests.conftest import shrunk_params, shrunk_raw, synthetic_dataset, synthetic_split


def _loaded() -> LoadedDataset:
    split = synthetic_split()
    return LoadedDataset(dataset_spec("av_digits"), synthetic_dataset(), {0: split, 1: split})


def _train(tmp_path, workers: int):
    tracker = RecordingTracker()
    records = train_teachers(shrunk_params(seeds=(0, 1), workers=workers), _loaded(), tmp_path / f"w{workers}",
                             tracker)
    return records, tracker.runs


def test_teachers_trained_in_two_workers_equal_the_serial_ones(tmp_path):
    torch.set_num_threads(1)
    serial, serial_runs = _train(tmp_path, 1)
    forked, forked_runs = _train(tmp_path, 2)
    # every field but the measured cost (wall time, peak memory)
    assert [dataclasses.replace(r, cost={}) for r in serial] == [dataclasses.replace(r, cost={}) for r in forked]
    assert all(r.cost["train_s"] > 0 for r in serial + forked)
    # 3 networks per seed; the unimodal ones double as the w/o KD rows (same settings for students and teachers)
    assert {r.stage for r in serial} == {"teachers"}
    assert [(r.setting, r.target) for r in serial if r.seed == 0] == [
        ("teacher", "multimodal"), ("teacher", "image"), ("teacher", "audio"), ("wo_kd", "image"), ("wo_kd", "audio")]
    for seed in (0, 1):
        for role in ("mm", "m1", "m2"):
            a = (tmp_path / "w1" / f"seed{seed}" / f"{role}.pt").read_bytes()
            b = (tmp_path / "w2" / f"seed{seed}" / f"{role}.pt").read_bytes()
            assert a == b, (seed, role)
    # the replayed runs carry the same names, params and per-epoch metrics, in job order
    assert [r.name for r in serial_runs] == [r.name for r in forked_runs]
    assert len(serial_runs) == 6  # the w/o KD rows are no runs of their own

    def metrics(runs):  # everything but the measured wall time and memory
        return [[({k: v for k, v in m.items() if k not in ("wall_time_s", "peak_memory_mb")}, step)
                 for m, step in r.metrics] for r in runs]
    assert metrics(serial_runs) == metrics(forked_runs)
    # per-epoch metrics are logged under the phase's name, one step per epoch
    for run in forked_runs:
        epochs = [(m, step) for m, step in run.metrics if "main/val_loss" in m]
        assert [step for _, step in epochs] == [0, 1], run.name
        assert {"main/train_loss", "main/val_accuracy", "main/best_epoch"} <= set(epochs[0][0])
    assert [r.params for r in serial_runs] == [r.params for r in forked_runs]
    assert all(any(name == "confusion_matrix.png" for name, _ in r.artifacts) for r in forked_runs)


def _failing_job(tracker):
    with tracker.run("bad", {"p": 1}, {}) as run:
        run.log_metrics({"x": 1.0}, step=0)
        raise ValueError("job failed on purpose")


def test_a_failing_job_is_replayed_as_failed_and_reraised():
    tracker = RecordingTracker()
    with pytest.raises(ValueError, match="on purpose"):
        run_jobs([Job("ok", lambda t: 7), Job("bad", _failing_job)], tracker, LocalPool(2, 1, "fork"))
    assert [(r.name, r.failed) for r in tracker.runs] == [("bad", True)]
    assert tracker.runs[0].metrics == [({"x": 1.0}, 0)]


def test_results_come_back_in_job_order():
    jobs = [Job(f"j{i}", lambda t, i=i: i * i) for i in range(5)]
    assert run_jobs(jobs, RecordingTracker(), LocalPool(2, 1, "fork")) == [0, 1, 4, 9, 16]
    assert executors._FORKED_JOBS == ()


def test_workers_resolution():
    assert resolve_workers(0, torch.device("cpu"), 100) >= 1
    assert resolve_workers(4, torch.device("cpu"), 3) == 3
    assert resolve_workers(4, torch.device("cuda"), 10) == 1
    assert resolve_workers(0, torch.device("cuda"), 10, runs_per_gpu=3) == 3   # runs packed on one GPU


def test_students_with_other_settings_get_their_own_wo_kd_runs(tmp_path):
    torch.set_num_threads(1)
    raw = shrunk_raw(seeds=(0,), workers=1)
    raw["training"]["av_digits"].update(epochs=1, batch_size=32, min_epochs=0)
    tracker = RecordingTracker()
    records = train_teachers(parse_params(raw), _loaded(), tmp_path, tracker)
    assert [(r.stage, r.setting, r.target, r.epochs) for r in records] == [
        ("teachers", "teacher", "multimodal", 2), ("teachers", "teacher", "image", 2),
        ("teachers", "teacher", "audio", 2), ("teachers", "wo_kd", "image", 1), ("teachers", "wo_kd", "audio", 1)]
    assert len(tracker.runs) == 5
    assert sorted(p.name for p in (tmp_path / "seed0").iterdir()) == ["m1.pt", "m2.pt", "mm.pt"]
