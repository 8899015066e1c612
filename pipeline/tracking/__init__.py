"""Experiment tracking behind a small interface (base.py); MLflow is the default implementation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.tracking.base import NullTracker, Tracker


@contextmanager
def open_tracker(enabled: bool, experiment: str, params_path: Path, stage: str,
                 stage_id: str | None = None) -> Iterator[Tracker]:
    """The stage's tracker; the pipeline's parent run is closed FINISHED, or FAILED if the stage raises.
    `stage_id` names the DVC stage instance whose earlier attempts this one supersedes (e.g.
    `distill@av_digits-kd`; default: `DVC_STAGE`, else `stage`)."""
    if not enabled:
        yield NullTracker()
        return
    from pipeline.tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker(experiment, Path(params_path).read_text(), {"pipeline.stage": stage},
                            stage_id=stage_id or os.environ.get("DVC_STAGE") or stage)
    try:
        yield tracker
    except BaseException:
        tracker.close(succeeded=False)
        raise
    tracker.close(succeeded=True)
