"""The prepare contract every dataset meets: validated, normalised float32 tensors on disk
(memory-mappable `.npy`, no pickles), the split file and a summary, written by the prepare stage and
read by every training stage (which never touch the raw files).

Layout of `data/prepared/<dataset>/`:
    m1.npy       (N, ...) float32   first modality, normalised as the authors do
    m2.npy       (N, ...) float32   second modality
    labels.npy   (N,)     int64     0..num_classes-1 (segmentation: (N, H, W) label maps, void included)
    split_indices.csv               the authors' permutations, columns group_0 … group_{P-1}
    summary.json                    sizes, shapes, class counts
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.catalog import DATASETS, dataset_spec
from pipeline.data.chunked import ChunkedArray
from pipeline.data.splits import SplitParams, make_group_permutations, make_permutations, write_split_file
from pipeline.data.validation import DataError, load_npy
from pipeline.io import check_writable

ARRAY_FILES = {"m1": "m1.npy", "m2": "m2.npy", "labels": "labels.npy"}
SPLIT_FILE = "split_indices.csv"
SUMMARY_FILE = "summary.json"
GROUPS_FILE = "groups.npy"     # present only for a group-disjoint split (splits.disjoint_groups)


def _save_float32(path: Path, array: np.ndarray | ChunkedArray) -> None:
    """Write `array` as a float32 .npy; a ChunkedArray is streamed into a memory-mapped file."""
    if not isinstance(array, ChunkedArray):
        np.save(path, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(array.shape))
    filled = 0
    for block in array.blocks():
        if tuple(block.shape[1:]) != tuple(array.shape[1:]) or filled + len(block) > len(array):
            raise DataError(f"{path.name}: a block of shape {tuple(block.shape)} does not fit {tuple(array.shape)}")
        out[filled:filled + len(block)] = block
        filled += len(block)
    if filled != len(array):
        raise DataError(f"{path.name}: {filled} samples produced, {len(array)} expected")
    out.flush()
    del out


def write_prepared(out_dir: Path, arrays: dict[str, np.ndarray | ChunkedArray], num_classes: int, *, permutations: int,
                   split_seed: int, summary: dict, groups: np.ndarray | None = None) -> dict:
    """Write the prepared tensors, split file and summary under `out_dir`, atomically (a temporary folder
    renamed into place: readers never see half of it); a ChunkedArray modality is streamed to disk. With
    `groups`, the split keeps each group in one part (groups.npy is written beside it). Returns the summary
    written."""
    out_dir = Path(out_dir)
    labels = np.asarray(arrays["labels"])
    n = len(labels)
    for key in ("m1", "m2"):
        if len(arrays[key]) != n:
            raise DataError(f"{key}: {len(arrays[key])} samples but {n} labels")
    if groups is not None and len(groups) != n:
        raise DataError(f"groups: {len(groups)} entries but {n} labels")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_arrays(tmp, arrays, labels, n, permutations, split_seed, groups)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {**summary, "n_samples": n, "num_classes": num_classes,
               "class_counts": np.bincount(labels.ravel(), minlength=num_classes).tolist(),   # pixels for maps
               "shapes": {key: list(arrays[key].shape[1:]) for key in ("m1", "m2")},
               "split_groups": None if groups is None else int(len(np.unique(groups)))}
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return summary


def _write_arrays(tmp: Path, arrays, labels: np.ndarray, n: int, permutations: int, split_seed: int,
                  groups: np.ndarray | None) -> None:
    _save_float32(tmp / ARRAY_FILES["m1"], arrays["m1"])
    _save_float32(tmp / ARRAY_FILES["m2"], arrays["m2"])
    np.save(tmp / ARRAY_FILES["labels"], labels.astype(np.int64), allow_pickle=False)
    if groups is None:
        write_split_file(tmp / SPLIT_FILE, make_permutations(n, permutations, split_seed))
    else:
        np.save(tmp / GROUPS_FILE, np.asarray(groups, dtype=np.int64), allow_pickle=False)
        write_split_file(tmp / SPLIT_FILE, make_group_permutations(groups, permutations, split_seed))


def read_prepared(folder: Path, num_classes: int, label_ndim: int = 0) -> dict[str, np.ndarray]:
    """The prepared arrays of `folder`, memory-mapped and checked (files, dtypes, sample counts, labels: one
    class per sample, or with `label_ndim` 2 one H×W map); every failure names the file."""
    folder = Path(folder)
    hint = f"run the dataset's prepare stage (`dvc repro prepare@{folder.name}`)"
    if not folder.is_dir():
        raise DataError(f"{folder}: prepared dataset not found; {hint}")
    arrays = {key: load_npy(folder / name, hint=hint) for key, name in ARRAY_FILES.items()}
    n = len(arrays["labels"])
    for key in ("m1", "m2"):
        if arrays[key].dtype != np.float32:
            raise DataError(f"{folder / ARRAY_FILES[key]}: expected float32, got {arrays[key].dtype}; {hint}")
        if len(arrays[key]) != n:
            raise DataError(f"{folder / ARRAY_FILES[key]}: {len(arrays[key])} samples but "
                            f"{folder / ARRAY_FILES['labels']} has {n}; {hint}")
    labels = arrays["labels"]
    if labels.dtype != np.int64 or labels.ndim != 1 + label_ndim or (
            n and (labels.min() < 0 or labels.max() >= num_classes)):
        raise DataError(f"{folder / ARRAY_FILES['labels']}: expected a {1 + label_ndim}-D int64 array of labels 0.."
                        f"{num_classes - 1}; {hint}")
    if (folder / GROUPS_FILE).is_file():
        arrays["groups"] = load_npy(folder / GROUPS_FILE, shape=(n,), hint=hint)
    return arrays


def prepare_dataset(key: str, raw_dir: Path, out_dir: Path, splits: SplitParams, blocks: Any) -> dict:
    """Load and validate dataset `key`'s raw files (its loader may read `blocks`, e.g. the AV-Digits build's
    spectrogram size; it may add a `summary` entry of extra facts and `groups`) and write the prepared tensors,
    the split file (the authors', or group-disjoint for a dataset listed in splits.disjoint_groups) and a
    summary under `out_dir`."""
    spec = dataset_spec(key)
    check_writable(Path(out_dir).parent)
    grouped = key in splits.disjoint_groups
    if grouped and spec.groups is None:
        raise DataError(f"splits.disjoint_groups: {key} has no sample groups to split by (only "
                        f"{', '.join(k for k, s in DATASETS.items() if s.groups) or 'none'})")
    arrays = dict(spec.load(raw_dir, blocks))
    extra = arrays.pop("summary", {})      # a loader may add facts to the summary (e.g. the extraction's)
    groups = arrays.pop("groups", None)
    if grouped and groups is None:
        raise DataError(f"{raw_dir}: splits.disjoint_groups lists {key}, but its files carry no {spec.groups} ids "
                        f"(the extraction stage writes them; see the README's {spec.display_name} section)")
    return write_prepared(out_dir, arrays, spec.num_classes, permutations=splits.permutations,
                          split_seed=splits.seed, summary={"dataset": key, **extra},
                          groups=groups if grouped else None)
