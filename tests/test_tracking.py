"""Tracking: runs recorded in memory (times, JSON, replay order), a fresh MLflow store opened by two processes at
once, run status on failure, and no metric logged twice at one step."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient as mlflow_client

from pipeline.tracking.base import NullTracker
from pipeline.tracking.recording import RecordedRun, RecordingTracker, now_ms, replay
from tests.conftest import REPO

OPEN_AND_LOG = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.tracking import open_tracker
    params = Path(sys.argv[1])
    # one stage each (as two queued experiments): a later attempt of one stage would supersede the earlier's run
    with open_tracker(True, "race", params, f"test-{sys.argv[2]}") as tracker:
        with tracker.run(f"run-{sys.argv[2]}", {"p": 1}, {"k": "v"}) as run:
            run.log_metrics({"m": 1.0}, step=0)
""")


def _env(root):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    env.update(DVC_ROOT=str(root), PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true")
    return env


def test_two_processes_opening_a_fresh_store_do_not_crash(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("x: 1\n")
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_LOG, str(params), str(i)], cwd=tmp_path,
                              env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("race")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("run.role") == "training"]
    assert sorted(r.info.run_name for r in children) == ["run-0", "run-1"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["m"] == 1.0 for r in children)
    assert experiment.artifact_location.endswith("/mlartifacts")


def test_a_failing_run_is_marked_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pipeline.tracking import open_tracker

    params = tmp_path / "params.yaml"
    params.write_text("x: 2\n")
    with pytest.raises(ValueError, match="bad data"):
        with open_tracker(True, "failing", params, "test") as tracker:
            with tracker.run("doomed", {}, {}):
                raise ValueError("bad data")
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs}["doomed"] == "FAILED"
    assert all(r.info.status == "FAILED" for r in runs)  # the pipeline's parent run too


def test_a_recording_keeps_run_and_metric_times_and_failures():
    tracker = RecordingTracker()
    before = now_ms()
    with tracker.run("ok", {"lr": 0.1}, {"k": "v"}) as run:
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_metrics({"best_epoch": 0}, step=None)
    with pytest.raises(RuntimeError):
        with tracker.run("bad", {}, {}) as run:
            raise RuntimeError("boom")
    after = now_ms()
    ok, bad = tracker.runs
    assert ok.metrics == [({"loss": 1.0}, 0), ({"best_epoch": 0.0}, None)] and not ok.failed
    assert before <= ok.start_ms <= ok.metric_times_ms[0] <= ok.metric_times_ms[1] <= ok.end_ms <= bad.start_ms
    assert bad.failed and bad.start_ms <= bad.end_ms <= after


def test_a_record_survives_json_exactly():
    record = RecordedRun("r", {"lr": 0.1, "hooks": ["fc1", "fc2"], "note": None}, {"k": "v"},
                         metrics=[({"loss": math.inf, "acc": 0.5}, 0), ({"best_epoch": 1.0}, None)],
                         artifacts=[("a.png", bytes(range(256)))], failed=True, start_ms=1, end_ms=5,
                         metric_times_ms=[2, 3])
    text = json.dumps(record.to_json(), allow_nan=False)  # strict JSON
    assert RecordedRun.from_json(json.loads(text)) == record
    diverged = RecordedRun("n", {}, {}, metrics=[({"loss": math.nan}, 0)], metric_times_ms=[0])
    back = RecordedRun.from_json(json.loads(json.dumps(diverged.to_json(), allow_nan=False)))
    assert math.isnan(back.metrics[0][0]["loss"])


def test_replay_forwards_records_in_order():
    records = [RecordedRun(name, {}, {}) for name in ("a", "b", "c")]
    outer = RecordingTracker()
    replay(records, outer)
    assert outer.runs == records
    NullTracker().replay(records[0])  # logs nothing, raises nothing


def test_no_metric_is_logged_twice_at_one_step_in_a_teachers_run(tmp_path):
    """Every (key, step) pair of a tiny real teachers run is logged once (a summary value logged without a
    step lands at step 0 in MLflow, beside the first epoch's values)."""
    from pipeline.data.catalog import dataset_spec
    from pipeline.orchestration.runs import LoadedDataset
    from pipeline.orchestration.teachers import train_teachers
    from tests.conftest import shrunk_params, synthetic_dataset, synthetic_split

    loaded = LoadedDataset(dataset_spec("av_digits"), synthetic_dataset(), {0: synthetic_split()})
    tracker = RecordingTracker()
    train_teachers(shrunk_params(workers=1), loaded, tmp_path, tracker)
    assert len(tracker.runs) == 3
    for run in tracker.runs:
        pairs = Counter((key, step or 0) for metrics, step in run.metrics for key in metrics)
        assert {pair: n for pair, n in pairs.items() if n > 1} == {}, run.name
        assert ("best_epoch", 0) in pairs and ("main/best_epoch", 0) in pairs, run.name
