"""Argument parsing shared by the stage scripts, and a clean exit on expected errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Callable

from pipeline.data.validation import DataError
from pipeline.params import ParamsError
from pipeline.training.checkpoints import CheckpointError

EXPECTED_ERRORS = (ParamsError, DataError, CheckpointError, FileNotFoundError, KeyError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return p


def training_parser(description: str) -> argparse.ArgumentParser:
    """Arguments of the stages that train on one dataset."""
    p = parser(description)
    p.add_argument("--dataset", required=True, help="dataset key, e.g. av_digits")
    p.add_argument("--raw", required=True, type=Path, help="folder holding the dataset's raw files")
    p.add_argument("--prepared", required=True, type=Path, help="output folder of the dataset's prepare stage")
    p.add_argument("--results", required=True, type=Path, help="JSON file receiving one record per run")
    return p


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; an expected error (bad params, bad data, bad checkpoint) prints one clear line
    and exits with status 1 instead of a traceback."""
    try:
        main()
    except EXPECTED_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
