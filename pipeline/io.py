"""Writing outputs safely: atomic JSON, a check that an output folder is writable before any work, and the
project root that the pipeline's own state lives in."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pipeline.errors import UserError


def project_root() -> Path:
    """The folder the pipeline's own state lives in (the MLflow store, the run cache): DVC's root under DVC,
    else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


class OutputError(UserError):
    """An output folder cannot be written; the message names it."""


def write_json(path: Path, payload) -> None:
    """Write JSON atomically, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_writable(*paths: Path) -> None:
    """Every folder a stage will write (a file's parent, or the folder itself) can be created and written;
    OutputError naming the first that cannot."""
    for path in paths:
        path = Path(path)
        folder = path.parent if path.suffix else path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as err:
            raise OutputError(f"{folder}: cannot write the stage's outputs here ({err.strerror or err}); fix the "
                              "folder's permissions or free space, then re-run") from None
