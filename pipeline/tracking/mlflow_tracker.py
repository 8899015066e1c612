"""MLflow tracking: a local sqlite store at the repository root, one experiment per dataset, one
parent run per pipeline invocation and one child run per trained network.

The store is `sqlite:///<root>/mlflow.db` with artifacts in `<root>/mlartifacts/`, where root is
DVC's `DVC_ROOT` (the main repository even for queued and temporary experiments) or else the
current directory; `MLFLOW_TRACKING_URI` overrides it. Opening a fresh sqlite store runs schema
migrations, which crash when two processes do it at once, so the first contact is serialised with a
file lock. Run ids never enter DVC-tracked files (they would change dvc.lock on every run).

The store tells the truth after a crash. Every run carries the identity of the attempt that logged it
(`pipeline.stage_id`, `pipeline.attempt`, `pipeline.host`, `pipeline.pid`), and opening a tracker, under the
file lock, first reconciles what earlier attempts left: RUNNING runs whose process on this host is gone are
set KILLED (`pipeline.interrupted`), and the child runs an earlier attempt of the same stage logged under the
same parent are tagged `pipeline.superseded` and soft-deleted (they stay findable with "Show deleted" or
`ViewType.ALL`); runs of processes still alive are left alone. Replayed runs keep the times they were
recorded at, so their duration is their training time.

MLflow makes every local artifact location absolute when it creates an experiment (its sqlalchemy store
resolves local URIs), so a relative location that would follow a copied repository is not possible. Instead,
when the default store's experiment points at the `mlartifacts/` of another root (the repository was moved or
copied), the stored artifact locations are rewritten to this root before anything is logged.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from pipeline.io import project_root
from pipeline.tracking.recording import RecordedRun, now_ms

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARENT_KEY_TAG = "pipeline.key"
STAGE_ID_TAG = "pipeline.stage_id"
ATTEMPT_TAG = "pipeline.attempt"
HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
INTERRUPTED_TAG = "pipeline.interrupted"
SUPERSEDED_TAG = "pipeline.superseded"
SUPERSEDED_BY_TAG = "pipeline.superseded_by"
PARENT_RUN_TAG = "mlflow.parentRunId"

_BATCH = 1000       # MLflow's limit of metrics per log_batch request
_PARAM_BATCH = 100  # and of params


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


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


class _MetricTimes:
    """The MLflow metrics of one run's logged values, timed so that none is lost: MLflow silently keeps one of
    equal (key, step, time, value) entries, so a (key, step) logged again is timed after the previous one (and one
    stderr line names the key; a repeat is a logging bug upstream)."""

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.last: dict[tuple[str, int], int] = {}
        self.warned: set[str] = set()

    def metrics(self, values: Mapping[str, float], step: int | None, time_ms: int) -> list:
        from mlflow.entities import Metric

        step = step or 0  # MLflow requires a step; values logged without one (a run's summary) go at step 0
        out = []
        for key, value in values.items():
            previous = self.last.get((key, step))
            at = time_ms if previous is None else max(time_ms, previous + 1)
            if previous is not None and key not in self.warned:
                self.warned.add(key)
                print(f"mlflow: run {self.run_name} logs metric {key} more than once at step {step} (every value "
                      "is kept)", file=sys.stderr)
            self.last[(key, step)] = at
            out.append(Metric(key, float(value), at, step))
        return out


class MlflowRunLogger:
    def __init__(self, client, run_id: str, run_name: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self._times = _MetricTimes(run_name or run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.client.log_batch(self.run_id, metrics=self._times.metrics(metrics, step, now_ms()))

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))


def _search_all(client, experiment_id: str, filter_string: str = "") -> list:
    """Every active run of the experiment matching `filter_string` (all result pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


# attempts of the trackers this process has open: its own runs are alive only if they belong to one of them
_OPEN_ATTEMPTS: set[str] = set()


def _process_state(tags: Mapping[str, str]) -> str:
    """`gone`: the run's process ran on this host and has ended; `alive`: it still runs here; `unknown`:
    another host's, or a run without the identity tags."""
    try:
        pid = int(tags.get(PID_TAG, ""))
    except ValueError:
        return "unknown"
    if tags.get(HOST_TAG) != socket.gethostname() or pid <= 0:
        return "unknown"
    if pid == os.getpid():  # an earlier process with this pid, or an earlier tracker of this process
        return "alive" if tags.get(ATTEMPT_TAG) in _OPEN_ATTEMPTS else "gone"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:  # another user's live process
        return "alive"
    return "alive"


def _end_interrupted_runs(client, experiment_id: str) -> int:
    """Set KILLED (end time now) every RUNNING run whose process on this host is gone; the number set."""
    stale = [r for r in _search_all(client, experiment_id, "attributes.status = 'RUNNING'")
             if _process_state(r.data.tags) == "gone"]
    for run in stale:
        client.set_tag(run.info.run_id, INTERRUPTED_TAG, "true")
        client.set_terminated(run.info.run_id, "KILLED")
    return len(stale)


def _supersede_earlier_runs(client, experiment_id: str, parent_id: str, stage_id: str, attempt: str) -> int:
    """Tag superseded and soft-delete the training runs other attempts of `stage_id` logged under `parent_id`
    (but those of a process still alive on this host); the number superseded."""
    from mlflow.entities import RunTag

    query = f"tags.`{PARENT_RUN_TAG}` = '{parent_id}'"
    if "'" not in stage_id and "\\" not in stage_id:  # narrowed in SQL when the id needs no quoting (always, for DVC's)
        query += f" and tags.`{STAGE_ID_TAG}` = '{stage_id}'"
    children = _search_all(client, experiment_id, query)
    earlier = [r for r in children if r.data.tags.get(STAGE_ID_TAG) == stage_id
               and r.data.tags.get("run.role") == "training" and r.data.tags.get(ATTEMPT_TAG) != attempt
               and r.data.tags.get(SUPERSEDED_TAG) != "true" and _process_state(r.data.tags) != "alive"]
    for run in earlier:
        client.log_batch(run.info.run_id, tags=[RunTag(SUPERSEDED_TAG, "true"), RunTag(SUPERSEDED_BY_TAG, attempt)])
        client.delete_run(run.info.run_id)
    return len(earlier)


def relocate_artifacts(experiment, root: Path) -> str | None:
    """When the default store's `experiment` keeps its artifacts in the `mlartifacts/` of another root (the
    repository was moved or copied), rewrite every stored location under that folder to `root`'s, in one
    sqlite transaction; the line that says so, or None when nothing moved. Call it under the store's lock."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    old, new = experiment.artifact_location, (root / "mlartifacts").as_uri()
    if old == new or not old.endswith("/mlartifacts") or not old.startswith(("file:", "/")):
        return None
    with closing(sqlite3.connect(root / "mlflow.db")) as db, db:  # `db` as a context manager: one transaction
        moved = db.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?",
                           (new, old)).rowcount
        runs = db.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                          "WHERE substr(artifact_uri, 1, ?) = ?", (new, len(old) + 1, len(old) + 1, old + "/")).rowcount
    return (f"mlflow: the repository moved: artifact locations of {moved} experiment(s) and {runs} run(s) rewritten "
            f"from {old} to {new}")


class MlflowTracker:
    """One experiment (per dataset) and the pipeline's parent run; `run()` opens child runs, `replay()` logs
    recorded ones. `stage_id` names one DVC stage instance (default: `DVC_STAGE`, else the base tags'
    `pipeline.stage`)."""

    def __init__(self, experiment: str, params_text: str, base_tags: Mapping[str, str],
                 stage_id: str | None = None) -> None:
        import filelock
        from mlflow.entities import RunTag
        from mlflow.tracking import MlflowClient

        warnings.filterwarnings("ignore", message=".*noload.*")  # SQLAlchemy 2.1 deprecation inside MLflow
        root = project_root()
        self.stage_id = stage_id or os.environ.get("DVC_STAGE") or base_tags.get("pipeline.stage", "")
        self.attempt = uuid.uuid4().hex
        self.identity = {STAGE_ID_TAG: self.stage_id, ATTEMPT_TAG: self.attempt, HOST_TAG: socket.gethostname(),
                         PID_TAG: str(os.getpid())}
        self.base_tags = {**environment_tags(), **base_tags, **self.identity}
        key = pipeline_key(params_text)
        notes = []
        with filelock.FileLock(str(root / ".mlflow.lock"), timeout=300):
            self.client = MlflowClient(tracking_uri(root))
            found = self.client.get_experiment_by_name(experiment)
            if found:
                self.experiment_id = found.experiment_id
                notes.append(relocate_artifacts(found, root))
            else:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=(root / "mlartifacts").as_uri())
            parents = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_KEY_TAG}` = '{key}'",
                                              max_results=1)
            killed = _end_interrupted_runs(self.client, self.experiment_id)
            superseded = 0
            if parents:
                self.parent_id = parents[0].info.run_id
                superseded = _supersede_earlier_runs(self.client, self.experiment_id, self.parent_id, self.stage_id,
                                                     self.attempt)
                self.client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in self.identity.items()])
                self.client.update_run(self.parent_id, status="RUNNING")
            else:
                self.parent_id = self.client.create_run(
                    self.experiment_id, run_name=key, tags={**self.base_tags, PARENT_KEY_TAG: key,
                                                            "run.role": "pipeline"}).info.run_id
        _OPEN_ATTEMPTS.add(self.attempt)
        counts = [f"{killed} runs of an interrupted attempt marked KILLED"] if killed else []
        counts += [f"{superseded} earlier runs of {self.stage_id} superseded"] if superseded else []
        notes.append("mlflow: " + "; ".join(counts) if counts else None)
        for note in filter(None, notes):
            print(note, file=sys.stderr)

    def _child_tags(self, tags: Mapping[str, str]) -> dict[str, str]:
        return {**self.base_tags, **tags, **self.identity, PARENT_RUN_TAG: self.parent_id, "run.role": "training"}

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        values = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(values), _PARAM_BATCH):
            self.client.log_batch(run_id, params=values[start:start + _PARAM_BATCH])

    @contextmanager
    def run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[MlflowRunLogger]:
        """A child run logged as it goes; it ends FINISHED, or FAILED if the block raises."""
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=self._child_tags(tags)).info.run_id
        try:
            self._log_params(run_id, params)
            yield MlflowRunLogger(self.client, run_id, name)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def replay(self, record: RecordedRun) -> None:
        """Log one recorded run as it happened: its real start and end times, each metric at its recorded time
        and step, its artifacts; it ends FINISHED, or FAILED when record.failed (or when logging it fails)."""
        run_id = self.client.create_run(self.experiment_id, start_time=record.start_ms or None, run_name=record.name,
                                        tags=self._child_tags(record.tags)).info.run_id
        end_ms = record.end_ms or None  # None: MLflow's now (a record without times)
        try:
            self._log_params(run_id, record.params)
            times = _MetricTimes(record.name)
            fallback = record.end_ms or now_ms()
            values = [m for i, (metrics, step) in enumerate(record.metrics) for m in times.metrics(
                metrics, step, record.metric_times_ms[i] if i < len(record.metric_times_ms) else fallback)]
            for start in range(0, len(values), _BATCH):
                self.client.log_batch(run_id, metrics=values[start:start + _BATCH])
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in record.artifacts:
                    path = Path(tmp) / name
                    path.write_bytes(data)
                    self.client.log_artifact(run_id, str(path))
        except BaseException:
            self.client.set_terminated(run_id, "FAILED", end_time=end_ms)
            raise
        self.client.set_terminated(run_id, "FAILED" if record.failed else "FINISHED", end_time=end_ms)

    def close(self, succeeded: bool) -> None:
        _OPEN_ATTEMPTS.discard(self.attempt)
        self.client.set_terminated(self.parent_id, "FINISHED" if succeeded else "FAILED")
