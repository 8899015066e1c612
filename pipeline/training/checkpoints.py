"""Checkpoints: a network's architecture description and weights, saved with torch.save and read
back with `weights_only=True` (no arbitrary unpickling)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.models.registry import Network, build_network


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not match the network it is loaded into."""


def save_checkpoint(path: Path, network: Network, state_dict: dict[str, torch.Tensor],
                    input_shapes: list[tuple[int, ...]], num_classes: int) -> None:
    """Write atomically (temporary file, then rename), so a crash never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"arch": network.arch, "inputs": list(network.inputs), "num_classes": num_classes,
               "input_shapes": [list(shape) for shape in input_shapes], "structure": dict(network.structure),
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
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint (corrupt, truncated or not written "
                              f"by this pipeline; re-run the stage that writes it): {type(err).__name__}: "
                              f"{_first_line(err)}") from err
    if not isinstance(payload, dict) or not {"arch", "inputs", "num_classes", "input_shapes", "state_dict"} <= set(payload):
        raise CheckpointError(f"{path}: expected a checkpoint dict with arch, inputs, num_classes, input_shapes "
                              "and state_dict")
    if expect_arch is not None and payload["arch"] != expect_arch:
        raise CheckpointError(f"{path}: holds a {payload['arch']!r} network, expected {expect_arch!r}")
    if expect_inputs is not None and tuple(payload["inputs"]) != tuple(expect_inputs):
        raise CheckpointError(f"{path}: network reads {payload['inputs']}, expected {list(expect_inputs)}")
    try:
        # the initial weights are overwritten below: building must not draw from the run's random stream, or
        # everything initialised after a load (MaskNets, a GateNet) would depend on how many checkpoints came first
        with torch.random.fork_rng(devices=[]):
            network = build_network(payload["arch"], payload["inputs"], payload["num_classes"],
                                    [tuple(s) for s in payload["input_shapes"]], payload.get("structure") or {})
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: describes a network that cannot be built: {err}") from err
    try:
        network.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit a {payload['arch']} network: {err}") from err
    return network.to(device)


def save_module_state(path: Path, module: torch.nn.Module) -> None:
    """Save a helper module's weights (e.g. MST-Distill's MaskNets) with its `checkpoint_meta` (what it was
    built for), atomically and weights-only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": type(module).__name__, "meta": getattr(module, "checkpoint_meta", {}),
               "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_module_state(path: Path) -> dict:
    """The payload written by `save_module_state`, read weights-only; CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (has the stage that writes it run? try `dvc repro`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt bytes surface as many exception types
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint (corrupt or truncated; re-run the "
                              f"stage that writes it): {type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(payload, dict) or not {"kind", "meta", "state_dict"} <= set(payload):
        raise CheckpointError(f"{path}: expected a module checkpoint with kind, meta and state_dict")
    return payload


def load_module_state(path: Path, module: torch.nn.Module) -> torch.nn.Module:
    """Load `save_module_state`'s file into `module`, checking that it was saved for the same kind of module
    and `checkpoint_meta`; CheckpointError naming the file otherwise."""
    payload = read_module_state(path)
    meta = getattr(module, "checkpoint_meta", {})
    if payload["kind"] != type(module).__name__ or payload["meta"] != meta:
        raise CheckpointError(f"{path}: holds a {payload['kind']} for {payload['meta']}, expected a "
                              f"{type(module).__name__} for {meta} (re-run the stage that writes it)")
    try:
        module.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit: {err}") from err
    return module


def _first_line(err: Exception) -> str:
    """What went wrong, in one line, never repeating PyTorch's advice to turn weights-only loading off."""
    text = str(err).strip()
    if text.startswith("Weights only load failed"):
        return "it holds Python objects other than tensors and plain containers, which are never unpickled"
    return text.splitlines()[0] if text else ""
