"""Pieces every feature-based method shares: tables keyed by (teacher architecture, student architecture),
their validation when params load, and the feature-shape probe."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from pipeline.data.tensors import Batch
from pipeline.models.registry import Network, available_architectures, module_names
from pipeline.models.taps import FeatureTaps
from pipeline.params import BlockError

T = TypeVar("T")
# teacher architecture -> student architecture -> entry (e.g. the hint pairs of FitNets)
PairTable = dict[str, dict[str, T]]


def pair_entry(table: PairTable, teacher: Network, student: Network, where: str) -> T:
    """The entry of `table` for this teacher → student architecture pair; KeyError naming the missing key."""
    entry = table.get(teacher.arch, {}).get(student.arch)
    if entry is None:
        known = ", ".join(f"{t}.{s}" for t, row in table.items() for s in row) or "none"
        raise KeyError(f"{where}.{teacher.arch}.{student.arch} is missing (the {teacher.arch} → {student.arch} "
                       f"pair; pairs listed: {known})")
    return entry


def check_architecture(arch: str, key: str) -> None:
    if arch not in available_architectures():
        raise BlockError(key, f"unknown architecture {arch!r}; known: {', '.join(available_architectures())}")


def check_modules(arch: str, names: Iterable[str], key: str) -> None:
    """BlockError naming `key` when a module name is not a submodule of `arch`."""
    known = module_names(arch)
    for name in names:
        if name not in known:
            raise BlockError(key, f"{name!r} is not a module of {arch}; its modules are: {', '.join(known)}")


def check_pair_table(table: PairTable, key: str, modules: Callable[[T], Iterable[tuple[str, str]]]) -> None:
    """Validate a table keyed by architecture pair: both architectures exist and every module the entry
    names (`modules(entry)` gives (side, module) with side "teacher" or "student") is one of theirs."""
    for teacher_arch, row in table.items():
        check_architecture(teacher_arch, f"{key}.{teacher_arch}")
        for student_arch, entry in row.items():
            where = f"{key}.{teacher_arch}.{student_arch}"
            check_architecture(student_arch, where)
            for side, name in modules(entry):
                check_modules(teacher_arch if side == "teacher" else student_arch, [name], where)


@torch.no_grad()
def probe_shapes(network: Network, names: list[str], sample: Batch) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of each named module of `network.body`, from one eval-mode forward of
    `sample` on the network's own device (train mode and BN statistics are left as they were); KeyError
    naming a missing module."""
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    try:
        with FeatureTaps(network.body, names) as taps:
            network({key: value.to(device) for key, value in sample.items()})
            return {name: tuple(taps[name].shape[1:]) for name in names}
    finally:
        network.train(was_training)
