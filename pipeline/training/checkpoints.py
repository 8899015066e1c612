"""Checkpoints: a network's architecture description and weights, saved with torch.save and read
back with `weights_only=True` (no arbitrary unpickling)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.models.registry import Network, build_network


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the network it is loaded into."""


def save_checkpoint(path: Path, network: Network, state_dict: dict[str, torch.Tensor],
                    input_shapes: list[tuple[int, ...]], num_classes: int) -> None:
    """Write atomically (temporary file, then rename), so a crash never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"arch": network.arch, "inputs": list(network.inputs), "num_classes": num_classes,
               "input_shapes": [list(shape) for shape in input_shapes],
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device, expect_arch: str | None = None,
                    expect_inputs: tuple[str, ...] | None = None) -> Network:
    """Rebuild the network stored at `path` on `device`; every failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (has the stage that writes it run? try `dvc repro`)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # corrupt bytes surface as many exception types (UnpicklingError, IndexError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated, or not weights-only?): "
                              f"{type(err).__name__}: {err}") from err
    if not isinstance(payload, dict) or not {"arch", "inputs", "num_classes", "input_shapes", "state_dict"} <= set(payload):
        raise CheckpointError(f"{path}: expected a checkpoint dict with arch, inputs, num_classes, input_shapes "
                              "and state_dict")
    if expect_arch is not None and payload["arch"] != expect_arch:
        raise CheckpointError(f"{path}: holds a {payload['arch']!r} network, expected {expect_arch!r}")
    if expect_inputs is not None and tuple(payload["inputs"]) != tuple(expect_inputs):
        raise CheckpointError(f"{path}: network reads {payload['inputs']}, expected {list(expect_inputs)}")
    try:
        network = build_network(payload["arch"], payload["inputs"], payload["num_classes"],
                                [tuple(s) for s in payload["input_shapes"]])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: describes a network that cannot be built: {err}") from err
    try:
        network.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit a {payload['arch']} network: {err}") from err
    return network.to(device)
