"""Argument parsing shared by the stage scripts, and a clean exit on expected errors."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from pipeline.errors import UserError

# UserError: bad params, data, checkpoints, results files or output folders (each layer's subclass);
# KeyError: a tap, hook or per-dataset entry a method needs is missing from its params block
EXPECTED_ERRORS = (UserError, FileNotFoundError, KeyError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return p


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; an expected error (bad params, bad data, bad checkpoint, unwritable output) prints one
    clear line and exits with status 1 instead of a traceback. SIGTERM (a job scheduler's stop, `kill`) unwinds
    like an error, so the stage's MLflow runs end FAILED and its worker processes are stopped."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except EXPECTED_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
