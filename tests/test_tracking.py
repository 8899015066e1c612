"""MLflow tracking: a fresh store opened by two processes at once, run status on failure."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

mlflow_client = pytest.importorskip("mlflow.tracking").MlflowClient

OPEN_AND_LOG = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.tracking import open_tracker
    params = Path(sys.argv[1])
    with open_tracker(True, "race", params, "test") as tracker:
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
