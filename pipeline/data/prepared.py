"""The prepare contract every dataset meets: validated, normalised float32 tensors on disk
(memory-mappable `.npy`, no pickles), the split file and a summary, written by the prepare stage and
read by every training stage (which never touch the raw files).

Layout of `data/prepared/<dataset>/`:
    m1.npy       (N, ...) float32   first modality, normalised as the authors do
    m2.npy       (N, ...) float32   second modality
    labels.npy   (N,)     int64     0..num_classes-1
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

from pipeline.data.catalog import dataset_spec
from pipeline.data.splits import SplitParams, make_permutations, write_split_file
from pipeline.data.validation import DataError, load_npy
from pipeline.io import check_writable

ARRAY_FILES = {"m1": "m1.npy", "m2": "m2.npy", "labels": "labels.npy"}
SPLIT_FILE = "split_indices.csv"
SUMMARY_FILE = "summary.json"


def write_prepared(out_dir: Path, arrays: dict[str, np.ndarray], num_classes: int, *, permutations: int,
                   split_seed: int, summary: dict) -> dict:
    """Write the prepared tensors, split file and summary under `out_dir`, atomically (a temporary folder
    renamed into place: readers never see half of it). Returns the summary written."""
    out_dir = Path(out_dir)
    labels = np.asarray(arrays["labels"])
    n = len(labels)
    for key in ("m1", "m2"):
        if len(arrays[key]) != n:
            raise DataError(f"{key}: {len(arrays[key])} samples but {n} labels")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / ARRAY_FILES["m1"], np.ascontiguousarray(arrays["m1"], dtype=np.float32), allow_pickle=False)
    np.save(tmp / ARRAY_FILES["m2"], np.ascontiguousarray(arrays["m2"], dtype=np.float32), allow_pickle=False)
    np.save(tmp / ARRAY_FILES["labels"], labels.astype(np.int64), allow_pickle=False)
    write_split_file(tmp / SPLIT_FILE, make_permutations(n, permutations, split_seed))
    summary = {**summary, "n_samples": n, "num_classes": num_classes,
               "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
               "shapes": {key: list(arrays[key].shape[1:]) for key in ("m1", "m2")}}
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return summary


def read_prepared(folder: Path, num_classes: int) -> dict[str, np.ndarray]:
    """The prepared arrays of `folder`, memory-mapped and checked (files, dtypes, sample counts, labels);
    every failure names the file."""
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
    if labels.dtype != np.int64 or labels.ndim != 1 or (n and (labels.min() < 0 or labels.max() >= num_classes)):
        raise DataError(f"{folder / ARRAY_FILES['labels']}: expected a 1-D int64 array of labels 0.."
                        f"{num_classes - 1}; {hint}")
    return arrays


def prepare_dataset(key: str, raw_dir: Path, out_dir: Path, splits: SplitParams, blocks: Any) -> dict:
    """Load and validate dataset `key`'s raw files (its loader may read `blocks`, e.g. the AV-Digits build's
    spectrogram size) and write the prepared tensors, the authors' split file and a summary under `out_dir`."""
    spec = dataset_spec(key)
    check_writable(Path(out_dir).parent)
    arrays = spec.load(raw_dir, blocks)
    return write_prepared(out_dir, arrays, spec.num_classes, permutations=splits.permutations,
                          split_seed=splits.seed, summary={"dataset": key})
