"""The small tracking interface the training code talks to; MLflow is one implementation, the
no-op tracker another (tests, `tracking.mlflow: false`). Math modules never import a tracker."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class RunLogger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path) -> None: ...


class Tracker(Protocol):
    def run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Any:
        """Context manager yielding a RunLogger; the run ends FINISHED, or FAILED if the block raises."""

    def replay(self, record) -> None:
        """Log one recorded run as it happened: its real start and end times, each metric at its recorded time
        and step, its artifacts; it ends FINISHED, or FAILED when record.failed. Never left RUNNING."""

    def close(self, succeeded: bool) -> None: ...


class NullRunLogger:
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass


class NullTracker:
    """Records nothing."""

    @contextmanager
    def run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[NullRunLogger]:
        yield NullRunLogger()

    def replay(self, record) -> None:
        pass

    def close(self, succeeded: bool) -> None:
        pass


@dataclass(frozen=True)
class TrackingParams:
    """`mlflow`: log every run to MLflow (false: log nothing, e.g. for quick local checks)."""

    mlflow: bool
