"""What every stage's runs share: the run device, independent runs side by side, and the checkpoints of
earlier stages (their paths, and a check of every one a stage will load before any training)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models.registry import Network
from pipeline.orchestration import parallel
from pipeline.orchestration.config import Params
from pipeline.orchestration.runs import ROLES, LoadedDataset, network_inputs
from pipeline.tracking.base import Tracker
from pipeline.training.checkpoints import load_checkpoint, read_module_state
from pipeline.training.runtime import resolve_device


def open_device(params: Params) -> torch.device:
    """The run device; also fixes torch's CPU thread count (`threads_per_run`), which every run of every
    stage uses whether it runs in the main process or in a worker, so results never depend on `workers`."""
    torch.set_num_threads(params.threads_per_run)
    return resolve_device(params.device)


def run_jobs(params: Params, loaded: LoadedDataset, jobs: list, tracker: Tracker) -> list:
    """A stage's independent runs, side by side in `params.workers` processes."""
    workers = parallel.resolve_workers(params.workers, loaded.data.device, len(jobs))
    return parallel.run_jobs(jobs, tracker, workers, params.threads_per_run)


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


