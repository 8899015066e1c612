"""What every stage's runs share: the run device, independent runs side by side (resumed after a crash), and
the checkpoints of earlier stages (their paths, and a check of every one a stage will load before any training)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models.registry import Network
from pipeline.orchestration import parallel
from pipeline.orchestration.config import Params
from pipeline.orchestration.executors import Job
from pipeline.orchestration.progress import StageProgress
from pipeline.orchestration.run_cache import RunCache, RunCacheBusy, stage_fingerprint
from pipeline.orchestration.runs import ROLES, LoadedDataset, network_inputs
from pipeline.tracking.base import Tracker
from pipeline.training.checkpoints import load_checkpoint, read_module_state
from pipeline.training.runtime import resolve_device


def open_device(params: Params) -> torch.device:
    """The run device; also fixes torch's CPU thread count (`threads_per_run`), which every run of every
    stage uses whether it runs in the main process or in a worker, so results never depend on `workers`."""
    torch.set_num_threads(params.threads_per_run)
    return resolve_device(params.device)


@dataclass
class StageSession:
    stage_id: str
    cache: RunCache | None


_SESSION: StageSession | None = None


def stage_id(*parts: str) -> str:
    """The stage instance's name: DVC's (`distill@av_digits-kd`) under DVC, else the parts joined."""
    return os.environ.get("DVC_STAGE") or "-".join(parts)


@contextmanager
def resumable_stage(name: str, params_path: Path, inputs: Sequence[Path],
                    device: torch.device) -> Iterator[StageSession]:
    """The stage's runs are resumable inside this block: each finished run is kept in the run cache (keyed by
    the params file, the code, the input files and the device), and a later attempt takes the finished ones
    back. Leaving the block normally (the stage wrote its outputs) forgets them; an exception keeps them."""
    global _SESSION
    cache = None
    try:
        cache = RunCache(name, stage_fingerprint(Path(params_path).read_text(), inputs, str(device)))
    except RunCacheBusy as busy:
        print(f"{name}: runs are not resumable in this attempt: {busy}", file=sys.stderr)
    _SESSION = StageSession(name, cache)
    try:
        yield _SESSION
    except BaseException:
        if cache is not None:
            cache.release()   # kept for the next attempt
        raise
    finally:
        _SESSION = None
    if cache is not None:
        cache.clear()


def run_jobs(params: Params, loaded: LoadedDataset, jobs: list[Job], tracker: Tracker) -> list:
    """A stage's independent runs with the executor of `params.executor` (resumed from the run cache inside
    `resumable_stage`), one progress line per finished run."""
    session = _SESSION
    executor = parallel.make_executor(params.executor, params.workers, params.threads_per_run, loaded.data.device,
                                      len(jobs))
    name = session.stage_id if session else jobs[0].name.split("/")[0] if jobs else "stage"
    return parallel.run_jobs(jobs, tracker, executor, cache=session.cache if session else None,
                             progress=StageProgress(name, len(jobs)))


def network_path(folder: Path, seed: int, role: str) -> Path:
    return folder / f"seed{seed}" / f"{role}.pt"


def masks_path(folder: Path, seed: int, target: str) -> Path:
    return folder / f"seed{seed}" / f"{target}.pt"


def load_network(loaded: LoadedDataset, folder: Path, seed: int, role: str,
                 device: torch.device | None = None) -> Network:
    """The checkpoint of `role` for `seed`, checked to hold the dataset's network for that role."""
    return load_checkpoint(network_path(folder, seed, role), device or loaded.data.device,
                           expect_arch=loaded.spec.networks[role], expect_inputs=network_inputs(role))


def check_networks(loaded: LoadedDataset, params: Params, folder: Path, roles=ROLES) -> None:
    """Load every network checkpoint a stage will read (on the CPU), so a missing, corrupt or wrong-architecture
    one stops the stage before any run trains."""
    for seed in params.seeds:
        for role in roles:
            load_network(loaded, folder, seed, role, torch.device("cpu"))


def check_masks(params: Params, folder: Path) -> None:
    """Read every phase-2 MaskNet file a stage will load (weights-only), before any run trains."""
    for seed in params.seeds:
        for target in ("m1", "m2"):
            read_module_state(masks_path(folder, seed, target))


