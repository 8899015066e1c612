"""The authors' split protocol (official-mst-spec.md §2.3).

`indices_gen.py` seeds NumPy's legacy global generator with 19980427 and draws 20 successive
permutations of the N sample positions, written as columns `group_0` … `group_19`. A run with seed s
reads column `group_s`: the first int(0.6·N) entries are train, the next up to int(0.8·N) val, the
rest test. Not stratified (quirk Q16).

Our addition, off by default: `disjoint_groups` lists datasets split by group (RAVDESS: actor), so no actor
appears in two of train/val/test. Each column then permutes the groups with the same generator, lists the
samples group by group (each group's samples in dataset order), and the cuts fall on group boundaries: the first
int(0.6·G) groups train, the next up to int(0.8·G) val, the rest test (RAVDESS: 14 / 5 / 5 actors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.data.validation import DataError
from pipeline.params import FRACTION, NON_NEGATIVE, POSITIVE, BlockError

AUTHORS_SPLIT_SEED = 19980427


@dataclass(frozen=True)
class SplitParams:
    """The `splits` block: the authors' protocol, `permutations` permutations of N from one seed, sliced
    train/val/test by run seed."""

    seed: int = field(metadata=NON_NEGATIVE)
    permutations: int = field(metadata=POSITIVE)
    train_fraction: float = field(metadata=FRACTION)
    val_fraction: float = field(metadata=FRACTION)
    disjoint_groups: list[str] = field(default_factory=list)   # datasets split by group (e.g. ravdess: actors)

    def validate(self) -> None:
        if self.train_fraction + self.val_fraction >= 1:
            raise BlockError("val_fraction", "train_fraction + val_fraction must leave a test split (< 1)")


@dataclass(frozen=True)
class Split:
    """Positions of the train, validation and test samples in the full dataset."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(self, name)).to(device) for name in ("train", "val", "test")}


def make_permutations(n_samples: int, count: int = 20, seed: int = AUTHORS_SPLIT_SEED) -> np.ndarray:
    """`count` successive permutations of range(n_samples) from the legacy MT19937 stream seeded with
    `seed`, as columns (identical to np.random.seed(seed) followed by np.random.permutation calls)."""
    rng = np.random.RandomState(seed)
    return np.stack([rng.permutation(n_samples) for _ in range(count)], axis=1)


def make_group_permutations(groups: np.ndarray, count: int = 20, seed: int = AUTHORS_SPLIT_SEED) -> np.ndarray:
    """`count` sample orders, each listing the samples group by group in a permuted group order (the legacy
    MT19937 stream seeded with `seed` permutes the sorted group ids), as columns."""
    groups = np.asarray(groups)
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in ids]
    rng = np.random.RandomState(seed)
    return np.stack([np.concatenate([members[g] for g in rng.permutation(len(ids))]) for _ in range(count)], axis=1)


def write_split_file(path: Path, permutations: np.ndarray) -> None:
    """Write permutations as the authors' CSV: an index column, then `group_0`, `group_1`, …"""
    header = ",".join([""] + [f"group_{j}" for j in range(permutations.shape[1])])
    rows = np.column_stack([np.arange(len(permutations)), permutations])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")


def read_split_column(path: Path, seed: int, n_samples: int) -> np.ndarray:
    """Column `group_{seed}` of a split file, checked to be a permutation of range(n_samples)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found; run the dataset's prepare stage (dvc repro)")
    with path.open() as handle:
        header = handle.readline().strip().split(",")
    column = f"group_{seed}"
    if column not in header:
        groups = [name for name in header if name.startswith("group_")]
        raise DataError(f"{path}: no column {column!r} for seed {seed}; the file has {len(groups)} split "
                        f"columns ({groups[0] if groups else 'none'}…), so seeds must be below {len(groups)}")
    try:
        values = np.loadtxt(path, delimiter=",", skiprows=1, usecols=header.index(column), dtype=np.int64, ndmin=1)
    except ValueError as err:
        raise DataError(f"{path}: column {column!r} is not a column of whole numbers: {err}") from err
    if len(values) != n_samples or not np.array_equal(np.sort(values), np.arange(n_samples)):
        raise DataError(f"{path}: column {column!r} must be a permutation of 0..{n_samples - 1} "
                        f"(the dataset has {n_samples} samples); got {len(values)} entries")
    return values


def split_positions(column: np.ndarray, train_fraction: float = 0.6, val_fraction: float = 0.2,
                    groups: np.ndarray | None = None) -> Split:
    """Slice one permutation into train / val / test by the authors' int() rule, over samples; with `groups`
    (a group-by-group column), over groups, so that no group spans two parts."""
    if groups is None:
        n = len(column)
        train_end = int(train_fraction * n)
        val_end = int((train_fraction + val_fraction) * n)
        return Split(train=column[:train_end], val=column[train_end:val_end], test=column[val_end:])
    ordered = np.asarray(groups)[column]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])   # where each run of one group begins
    if len(starts) != len(np.unique(ordered)):
        raise DataError("split column does not list the samples group by group; re-run the prepare stage")
    g = len(starts)
    bounds = np.r_[starts, len(column)]
    train_end, val_end = bounds[int(train_fraction * g)], bounds[int((train_fraction + val_fraction) * g)]
    return Split(train=column[:train_end], val=column[train_end:val_end], test=column[val_end:])
