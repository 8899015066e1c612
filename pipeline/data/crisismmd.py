"""The CrisisMMD v2.0 (humanitarian task) feature layout and its loader, as the authors use it (`CMMD-V2`).

Layout under the dataset root (what `pipeline/extraction/crisismmd.py` writes):
    CMMD_data.npz    arrays `image` (N, 2048) float32 (ResNet-50 pool features), `text` (N, 768) float32
                     (BERTweet pooler output), `labels` (N,) int64 in 0..7 (CLASSES order)
    all_data.tsv     optional: one row per sample in the same order (tweet_text, image, label, tweet_id)
    extraction.json  optional: the extraction's summary, copied into the prepared summary

The authors store the same three arrays as a pickled tuple in `CMMD_data.pth` (`torch.save`); we never unpickle,
so that file is refused with the way to convert it. The authors' loader applies no normalisation, and neither
does this one (m1 = image features, m2 = text features).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.validation import DataError

FEATURE_FILE = "CMMD_data.npz"
AUTHORS_FILE = "CMMD_data.pth"
ROWS_FILE = "all_data.tsv"
EXTRACTION_FILE = "extraction.json"
IMAGE_DIM = 2048
TEXT_DIM = 768
CLASSES = ("not_humanitarian", "affected_individuals", "infrastructure_and_utility_damage", "injured_or_dead_people",
           "missing_or_found_people", "rescue_volunteering_or_donation_effort", "vehicle_damage",
           "other_relevant_information")
NUM_CLASSES = len(CLASSES)

LAYOUT = (f"{FEATURE_FILE} with arrays image (N×{IMAGE_DIM} float32, ResNet-50 pool), text (N×{TEXT_DIM} float32, "
          f"BERTweet pooler) and labels (N, int64 0..{NUM_CLASSES - 1}); optional {ROWS_FILE} (one row per sample) "
          f"and {EXTRACTION_FILE} — written by the extract@crisismmd_v2 stage from the CrisisMMD v2.0 release")


def load(root: Path) -> dict[str, Any]:
    """Load the CrisisMMD features: m1 = image (N, 2048), m2 = text (N, 768) float32 as stored (no normalisation,
    as the authors), labels (N,) int64, and a summary (with the extraction's summary when present)."""
    root = Path(root)
    path = root / FEATURE_FILE
    if not path.is_file():
        _refuse_missing(root, path)
    arrays = _read_npz(path)
    n = len(arrays["labels"])
    _check_feature(arrays["image"], path, "image", n, IMAGE_DIM)
    _check_feature(arrays["text"], path, "text", n, TEXT_DIM)
    labels = _check_labels(arrays["labels"], path)
    _check_rows_file(root / ROWS_FILE, n)
    summary: dict[str, Any] = {"source": FEATURE_FILE, "classes": list(CLASSES), "normalisation": "none (authors)"}
    if (root / EXTRACTION_FILE).is_file():
        summary["extraction"] = _read_json(root / EXTRACTION_FILE)
    return {"m1": arrays["image"].astype(np.float32, copy=False), "m2": arrays["text"].astype(np.float32, copy=False),
            "labels": labels, "summary": summary}


def _refuse_missing(root: Path, path: Path) -> None:
    if (root / AUTHORS_FILE).is_file():
        raise DataError(f"{root / AUTHORS_FILE}: the authors' pickled torch.save file is not read (unpickling runs "
                        f"code); run the extract@crisismmd_v2 stage on the raw release, or re-save its tuple as "
                        f"{FEATURE_FILE} with np.savez(path, image=<N×{IMAGE_DIM}>, text=<N×{TEXT_DIM}>, labels=<N>)")
    raise DataError(f"{path}: file not found; expected {LAYOUT}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("image", "text", "labels") if key not in data.files]
            if missing:
                raise DataError(f"{path}: array {missing[0]!r} missing (has {', '.join(data.files) or 'none'}); "
                                "expected arrays image, text, labels")
            return {key: data[key] for key in ("image", "text", "labels")}
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz archive (truncated, corrupt or pickled?): {err}") from err


def _check_feature(array: np.ndarray, path: Path, key: str, n: int, dim: int) -> None:
    if array.ndim != 2 or array.shape[1] != dim:
        raise DataError(f"{path}: {key} has shape {tuple(array.shape)}; expected (N, {dim})")
    if len(array) != n:
        raise DataError(f"{path}: {key} has {len(array)} rows but labels has {n}; expected equal counts")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: {key} has dtype {array.dtype}; expected float32 features")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise DataError(f"{path}: {key} row {int(np.flatnonzero(~finite)[0])} contains NaN or infinite values; "
                        "expected finite features")


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels has shape {tuple(labels.shape)} and dtype {labels.dtype}; expected (N,) "
                        "integers")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{path}: label {int(labels[bad[0]])} at row {int(bad[0])} is outside 0..{NUM_CLASSES - 1} "
                        f"({bad.size} bad labels in all)")
    return labels.astype(np.int64)


def _check_rows_file(path: Path, n: int) -> None:
    """The optional per-sample table must describe exactly the N samples of the feature file."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", newline="") as handle:
        rows = sum(1 for fields in csv.reader(handle, delimiter="\t") if fields) - 1
    if rows != n:
        raise DataError(f"{path}: {rows} sample rows but {FEATURE_FILE} has {n}; expected one row per sample")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not readable JSON: {err}") from err
