"""MLflow tracking: a local sqlite store at the repository root, one experiment per dataset, one
parent run per pipeline invocation and one child run per trained network.

The store is `sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts/`, where root is
DVC's `DVC_ROOT` (the main repository even for queued and temporary experiments) or else the
current directory; `MLFLOW_TRACKING_URI` overrides it. Opening a fresh sqlite store runs schema
migrations, which crash when two processes do it at once, so the first contact is serialised with a
file lock. Run ids never enter DVC-tracked files (they would change dvc.lock on every run).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARENT_KEY_TAG = "pipeline.key"


def store_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or store_root()) / 'mlflow.db'}"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def pipeline_key(params_text: str) -> str:
    """Groups the runs of one pipeline invocation: the DVC experiment name under `dvc exp run`,
    else `repro:<commit>:<params hash>` (two repros of the same commit and params share a parent)."""
    if os.environ.get("CMKD_PIPELINE_KEY"):
        return os.environ["CMKD_PIPELINE_KEY"]
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp:{os.environ['DVC_EXP_NAME']}"
    commit = _git("rev-parse", "--short=12", "HEAD") or "nocommit"
    return f"repro:{commit}:{hashlib.md5(params_text.encode()).hexdigest()[:8]}"


def environment_tags() -> dict[str, str]:
    import torch

    return {
        "git.commit": _git("rev-parse", "HEAD") or "unknown",
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "torch.version": torch.__version__,
    }


class MlflowRunLogger:
    def __init__(self, client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_metric_series(self, series: list[tuple[Mapping[str, float], int | None]]) -> None:
        """Many steps' metrics in as few requests as MLflow allows (1,000 values per batch)."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        values = [Metric(k, float(v), now, step or 0) for metrics, step in series for k, v in metrics.items()]
        for start in range(0, len(values), 1000):
            self.client.log_batch(self.run_id, metrics=values[start:start + 1000])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))


class MlflowTracker:
    """One experiment (per dataset) and the pipeline's parent run; `run()` opens child runs."""

    def __init__(self, experiment: str, params_text: str, base_tags: Mapping[str, str]) -> None:
        import filelock
        from mlflow.tracking import MlflowClient

        warnings.filterwarnings("ignore", message=".*noload.*")  # SQLAlchemy 2.1 deprecation inside MLflow
        root = store_root()
        self.base_tags = {**environment_tags(), **base_tags}
        key = pipeline_key(params_text)
        with filelock.FileLock(str(root / ".mlflow.lock"), timeout=300):
            self.client = MlflowClient(tracking_uri(root))
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=(root / "mlartifacts").as_uri()))
            parents = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_KEY_TAG}` = '{key}'",
                                              max_results=1)
            if parents:
                self.parent_id = parents[0].info.run_id
                self.client.update_run(self.parent_id, status="RUNNING")
            else:
                self.parent_id = self.client.create_run(
                    self.experiment_id, run_name=key, tags={**self.base_tags, PARENT_KEY_TAG: key,
                                                            "run.role": "pipeline"}).info.run_id

    @contextmanager
    def run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[MlflowRunLogger]:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run_id = self.client.create_run(self.experiment_id, run_name=name, tags={
            **self.base_tags, **tags, MLFLOW_PARENT_RUN_ID: self.parent_id, "run.role": "training"}).info.run_id
        try:
            self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
            yield MlflowRunLogger(self.client, run_id)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def close(self, succeeded: bool) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED" if succeeded else "FAILED")
