"""MLflow after a crash: replayed runs keep their real times, runs of dead processes end KILLED, a stage's
second attempt supersedes the first one's runs, a copied store writes into its own mlartifacts/, and no run
is ever left RUNNING."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import mlflow.tracking as mlflow_tracking
import pytest
from mlflow.entities import ViewType

from pipeline.tracking import open_tracker
from pipeline.tracking.mlflow_tracker import ATTEMPT_TAG, HOST_TAG, PID_TAG, STAGE_ID_TAG
from pipeline.tracking.recording import RecordedRun, now_ms
from tests.conftest import REPO


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A sqlite store with MLflow's schema and no experiment (creating the schema takes seconds: done once)."""
    folder = tmp_path_factory.mktemp("empty_store")
    client(folder).search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def root(tmp_path, monkeypatch, empty_store):
    """A repository root with params.yaml and an empty default store, pipeline key `key-1`."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("CMKD_PIPELINE_KEY", "key-1")
    for name in ("MLFLOW_TRACKING_URI", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "params.yaml").write_text("x: 1\n")
    return tmp_path


def client(root):
    return mlflow_tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def all_runs(root, experiment: str, view=ViewType.ALL):
    c = client(root)
    return c.search_runs([c.get_experiment_by_name(experiment).experiment_id], run_view_type=view)


def record(name: str, *, failed: bool = False, artifact: bytes | None = None) -> RecordedRun:
    """A run recorded a minute ago: 50 s of training, two epochs and a summary."""
    start = now_ms() - 60_000
    return RecordedRun(name, {"lr": 0.01}, {"run.stage": "distill"},
                       metrics=[({"main/loss": 2.0}, 0), ({"main/loss": 1.5}, 1), ({"best_epoch": 1.0}, None)],
                       artifacts=[("history.csv", artifact)] if artifact else [], failed=failed, start_ms=start,
                       end_ms=start + 50_000, metric_times_ms=[start + 20_000, start + 40_000, start + 49_000])


def test_a_replayed_run_keeps_its_start_end_and_metric_times(root):
    rec = record("timed", artifact=b"epoch,loss\n0,2.0\n")
    with open_tracker(True, "times", root / "params.yaml", "distill") as tracker:
        tracker.replay(rec)
        with tracker.run("direct", {"lr": 0.01}, {"run.stage": "distill"}) as logger:
            logger.log_metrics({"main/loss": 2.0}, step=0)
    c = client(root)
    runs = {r.info.run_name: r for r in all_runs(root, "times")}
    run, direct = runs["timed"], runs["direct"]
    assert direct.data.tags.keys() == run.data.tags.keys()  # runs logged directly are tagged as replayed ones
    assert direct.info.status == "FINISHED" and direct.data.metrics == {"main/loss": 2.0}
    assert (run.info.start_time, run.info.end_time, run.info.status) == (rec.start_ms, rec.end_ms, "FINISHED")
    history = c.get_metric_history(run.info.run_id, "main/loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(0, 2.0, rec.start_ms + 20_000),
                                                                 (1, 1.5, rec.start_ms + 40_000)]
    assert [(m.step, m.timestamp) for m in c.get_metric_history(run.info.run_id, "best_epoch")] == [
        (0, rec.start_ms + 49_000)]
    assert run.data.params == {"lr": "0.01"}
    assert [f.path for f in c.list_artifacts(run.info.run_id)] == ["history.csv"]
    assert {run.data.tags[k] for k in (STAGE_ID_TAG, PID_TAG)} == {"distill", str(os.getpid())}


def test_a_metric_repeated_at_one_step_is_kept_and_reported(root, capsys):
    rec = record("repeats")
    rec.metrics.append(({"best_epoch": 1.0}, 0))         # the summary's value again, at the same step
    rec.metric_times_ms.append(rec.metric_times_ms[-1])  # and in the same millisecond
    with open_tracker(True, "repeats", root / "params.yaml", "distill") as tracker:
        tracker.replay(rec)
    (run,) = [r for r in all_runs(root, "repeats") if r.info.run_name == "repeats"]
    assert len(client(root).get_metric_history(run.info.run_id, "best_epoch")) == 2  # MLflow merges exact repeats
    assert "run repeats logs metric best_epoch more than once at step 0" in capsys.readouterr().err


KILLED_WHILE_LOGGING = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from pipeline.tracking import open_tracker
    from pipeline.tracking.recording import RecordedRun, now_ms
    with open_tracker(True, "crash", Path(sys.argv[1]), "distill", stage_id="distill@d-kd") as tracker:
        tracker.replay(RecordedRun("done", {"p": 1}, {}, [({"m": 1.0}, 0)], start_ms=now_ms(), end_ms=now_ms(),
                                   metric_times_ms=[now_ms()]))
        with tracker.run("dying", {"p": 2}, {}):
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_stage_killed_while_logging_is_reconciled_by_its_next_attempt(root, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_LOGGING, str(root / "params.yaml")], cwd=root,
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    before = {r.info.run_name: r.info.status for r in all_runs(root, "crash")}
    assert before == {"key-1": "RUNNING", "done": "FINISHED", "dying": "RUNNING"}  # what kill -9 leaves

    with open_tracker(True, "crash", root / "params.yaml", "distill", stage_id="distill@d-kd") as tracker:
        tracker.replay(record("done"))
    assert ("mlflow: 2 runs of an interrupted attempt marked KILLED; 2 earlier runs of distill@d-kd superseded"
            in capsys.readouterr().err)
    runs = all_runs(root, "crash")
    assert all(r.info.status != "RUNNING" for r in runs)
    old = {r.info.run_name: r for r in runs if r.data.tags[ATTEMPT_TAG] != tracker.attempt}
    assert (old["dying"].info.status, old["dying"].data.tags["pipeline.interrupted"]) == ("KILLED", "true")
    assert old["dying"].info.end_time is not None
    assert old["done"].info.status == "FINISHED"  # superseded, not rewritten
    for run in old.values():
        assert run.info.lifecycle_stage == "deleted"
        assert run.data.tags["pipeline.superseded"] == "true"
        assert run.data.tags["pipeline.superseded_by"] == tracker.attempt
    active = all_runs(root, "crash", ViewType.ACTIVE_ONLY)
    assert sorted((r.info.run_name, r.info.status) for r in active) == [("done", "FINISHED"), ("key-1", "FINISHED")]


def test_running_runs_of_live_processes_and_other_hosts_are_left_alone(root):
    with open_tracker(True, "hosts", root / "params.yaml", "distill") as tracker:
        pass
    c = client(root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        host = tracker.identity[HOST_TAG]
        left = [("dead", host, dead.pid), ("live", host, live.pid), ("elsewhere", "other-host", dead.pid)]
        ids = {name: c.create_run(tracker.experiment_id, run_name=name,
                                  tags={HOST_TAG: h, PID_TAG: str(pid)}).info.run_id for name, h, pid in left}
        with open_tracker(True, "hosts", root / "params.yaml", "teachers"):
            status = {name: c.get_run(run_id).info.status for name, run_id in ids.items()}
    finally:
        live.kill()
        live.wait()
    assert status == {"dead": "KILLED", "live": "RUNNING", "elsewhere": "RUNNING"}
    assert c.get_run(ids["dead"]).data.tags["pipeline.interrupted"] == "true"


def test_a_second_attempt_supersedes_only_its_own_stage_under_its_own_parent(root, monkeypatch, capsys):
    def attempt(stage_id: str, names: list[str], key: str = "key-1") -> str:
        monkeypatch.setenv("CMKD_PIPELINE_KEY", key)
        with open_tracker(True, "attempts", root / "params.yaml", "distill", stage_id=stage_id) as tracker:
            for name in names:
                tracker.replay(record(name))
        return tracker.attempt

    first = attempt("distill@d-kd", ["a", "b"])
    attempt("distill@d-fitnets", ["other-stage"])
    attempt("distill@d-kd", ["other-key"], key="key-2")
    capsys.readouterr()
    second = attempt("distill@d-kd", ["a", "b"])
    assert "mlflow: 2 earlier runs of distill@d-kd superseded" in capsys.readouterr().err
    runs = [r for r in all_runs(root, "attempts") if r.data.tags.get("run.role") == "training"]
    deleted = {(r.info.run_name, r.data.tags[ATTEMPT_TAG], r.data.tags.get("pipeline.superseded_by"))
               for r in runs if r.info.lifecycle_stage == "deleted"}
    assert deleted == {("a", first, second), ("b", first, second)}
    active = [r for r in all_runs(root, "attempts", ViewType.ACTIVE_ONLY) if r.data.tags["run.role"] == "training"]
    assert sorted((r.info.run_name, r.data.tags[ATTEMPT_TAG] == second) for r in active) == [
        ("a", True), ("b", True), ("other-key", False), ("other-stage", False)]


def test_a_copied_store_writes_into_its_own_artifact_folder(root, tmp_path_factory, monkeypatch, capsys):
    with open_tracker(True, "copied", root / "params.yaml", "distill") as tracker:
        tracker.replay(record("original", artifact=b"old"))
    copy = tmp_path_factory.mktemp("copy") / "repo"
    shutil.copytree(root, copy)
    files_before = sorted((p, p.stat().st_mtime_ns) for p in (root / "mlartifacts").rglob("*"))
    monkeypatch.setenv("DVC_ROOT", str(copy))
    capsys.readouterr()
    with open_tracker(True, "copied", copy / "params.yaml", "teachers") as tracker:
        tracker.replay(record("in-copy", artifact=b"new"))
    assert "mlflow: the repository moved" in capsys.readouterr().err
    new_prefix = (copy / "mlartifacts").as_uri() + "/"
    c = client(copy)
    assert c.get_experiment_by_name("copied").artifact_location == (copy / "mlartifacts").as_uri()
    runs = {r.info.run_name: r for r in all_runs(copy, "copied")}
    assert all(r.info.artifact_uri.startswith(new_prefix) for r in runs.values())
    run_id = runs["in-copy"].info.run_id
    assert (copy / "mlartifacts" / run_id / "artifacts" / "history.csv").read_bytes() == b"new"
    assert sorted((p, p.stat().st_mtime_ns) for p in (root / "mlartifacts").rglob("*")) == files_before
    assert sorted(r.info.run_name for r in all_runs(root, "copied")) == ["key-1", "original"]  # the original store


def test_no_run_is_left_running_after_a_failure(root):
    with pytest.raises(ValueError, match="in the block"):
        with open_tracker(True, "failures", root / "params.yaml", "distill") as tracker:
            tracker.replay(record("failed-in-worker", failed=True))
            with tracker.run("failed-here", {}, {}):
                raise ValueError("in the block")
    with pytest.raises(OSError, match="disk full"):
        with open_tracker(True, "failures", root / "params.yaml", "distill") as tracker:
            def full(*args):
                raise OSError("disk full")
            tracker.client.log_artifact = full
            tracker.replay(record("failed-logging", artifact=b"x"))
    status = {r.info.run_name: r.info.status for r in all_runs(root, "failures")}
    assert status == {"key-1": "FAILED", "failed-in-worker": "FAILED", "failed-here": "FAILED",
                      "failed-logging": "FAILED"}
    (logged,) = [r for r in all_runs(root, "failures") if r.info.run_name == "failed-logging"]
    assert logged.data.metrics["main/loss"] == 1.5  # what was logged before the failure stays
