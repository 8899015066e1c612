"""The VGGSound-AVEL50k feature layout (what the authors' loader reads, and what our extraction writes) and its
loader.

Per clip the authors store one VGG19 pool5 map per 1-s segment, `(10, 7, 7, 512)` channel-last, and one VGGish
embedding per segment, `(10, 128)`; the models permute the visual maps themselves. The classification label is
the metadata's class id (the authors' (10, 143) AVEL matrix only ever serves `label[0, -1]`, the same id); the
per-second event flags are validated and summarised, not returned.

Normalisation is the authors' preprocessing step 3 (`preprocess_VGGsound50K_3.py`): one global minimum and
maximum per modality over the whole dataset (all splits), x -> (x - min) / (max - min). On features that are
already normalised that way (min 0, max 1) the step changes nothing, so pointing the loader at the authors'
`VGGS50K_features_normed/` copies is safe. The visual modality (about 50 GB as float32 for 50k clips) is
returned as a ChunkedArray streamed from the per-clip files in two passes (global min/max, then normalised
blocks); the audio modality (about 256 MB) is returned in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.data.chunked import ChunkedArray
from pipeline.data.validation import DataError, load_npy

NUM_CLASSES = 141
SEGMENTS = 10
VISUAL_SHAPE = (SEGMENTS, 7, 7, 512)
AUDIO_SHAPE = (SEGMENTS, 128)
SEG_LABEL_SHAPE = (1, SEGMENTS)
METADATA_FILE = "VGGS50k_metadata.txt"
CLASSES_FILE = "classes.txt"
EXTRACTION_FILE = "extraction.json"
VISUAL_DIR, AUDIO_DIR = "visual_features", "audio_features"
SEG_DIRS = ("seg_labels", "seg_label")     # the authors' loader reads seg_labels/, their writer makes seg_label/
# Where the two feature folders may sit: the root itself (our extraction), or the authors' normalised / raw
# feature folders next to the metadata file.
FEATURE_PARENTS = ("", "VGGS50K_features_normed", "VGGS50K_features")

LAYOUT = (f"{METADATA_FILE} (lines `<stem>&<class id 0..{NUM_CLASSES - 1}>`), {VISUAL_DIR}/<stem>_vFeature.npy "
          f"{VISUAL_SHAPE}, {AUDIO_DIR}/<stem>_aFeature.npy {AUDIO_SHAPE} (the two feature folders directly under "
          f"the root, or under VGGS50K_features_normed/ or VGGS50K_features/), and "
          f"seg_labels/<stem>_sLabel.npy {SEG_LABEL_SHAPE} with 0/1 per-second event flags (seg_label/ is "
          "accepted too) — the authors' VGGS50K folder, or the output of the vggsound50k extraction")


def load(root: Path, block_size: int = 256) -> dict:
    """The VGGSound-50k features under `root`: visual (N,10,7,7,512) as a ChunkedArray and audio (N,10,128)
    float32, each min-max normalised with one global min/max, class ids (N,) int64 and a summary of facts.
    Every file is checked to exist before any feature is read."""

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; expected {LAYOUT}")
    stems, labels = read_metadata(root / METADATA_FILE)
    features = feature_folder(root)
    seg_dir = segment_folder(root)
    visual = [features / VISUAL_DIR / f"{stem}_vFeature.npy" for stem in stems]
    audio = [features / AUDIO_DIR / f"{stem}_aFeature.npy" for stem in stems]
    seg = [seg_dir / f"{stem}_sLabel.npy" for stem in stems]
    require_all(visual + audio + seg)
    foreground = read_segment_labels(seg)
    audio_array, audio_range = normalised_audio(audio)
    visual_range = global_range(visual, VISUAL_SHAPE)
    summary = {"layout": {"feature_folder": str(features.relative_to(root)), "segment_folder": seg_dir.name},
               "segment_foreground_fraction": round(float(foreground.mean()), 6) if len(stems) else None,
               "normalisation": {"rule": "global min-max per modality (authors' step 3)",
                                 "visual_min": visual_range[0], "visual_max": visual_range[1],
                                 "audio_min": audio_range[0], "audio_max": audio_range[1]}}
    summary.update(optional_facts(root))
    return {"m1": ChunkedArray((len(stems), *VISUAL_SHAPE), lambda: normalised_blocks(visual, visual_range,
                                                                                     block_size)),
            "m2": audio_array, "labels": labels, "summary": summary}


def read_metadata(path: Path) -> tuple[list[str], np.ndarray]:
    """The stems and class ids of `VGGS50k_metadata.txt` (`<stem>&<label>` per line, blank lines ignored)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected {LAYOUT}")
    stems, labels, seen = [], [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        stem, sep, label = line.strip().rpartition("&")
        if not sep or not stem or not label.strip().lstrip("-").isdigit():
            raise DataError(f"{path}: line {number} {line.strip()!r} is not `<stem>&<class id>`")
        if not 0 <= int(label) < NUM_CLASSES:
            raise DataError(f"{path}: line {number}: label {int(label)} is out of range; expected 0.."
                            f"{NUM_CLASSES - 1}")
        if stem in seen:
            raise DataError(f"{path}: line {number}: stem {stem!r} is listed twice; expected each clip once")
        seen.add(stem)
        stems.append(stem)
        labels.append(int(label))
    if not stems:
        raise DataError(f"{path}: no `<stem>&<class id>` lines; expected one per clip")
    return stems, np.asarray(labels, dtype=np.int64)


def feature_folder(root: Path) -> Path:
    """The folder holding visual_features/ and audio_features/: the root, else the authors' feature folders."""
    for parent in FEATURE_PARENTS:
        folder = root / parent if parent else root
        if (folder / VISUAL_DIR).is_dir() and (folder / AUDIO_DIR).is_dir():
            return folder
    raise DataError(f"{root / VISUAL_DIR}: folder not found (nor {AUDIO_DIR}/, nor under "
                    f"{' or '.join(p + '/' for p in FEATURE_PARENTS if p)}); expected {LAYOUT}")


def segment_folder(root: Path) -> Path:
    """seg_labels/ (what the authors' loader reads), else seg_label/ (what their writer makes)."""
    for name in SEG_DIRS:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root / SEG_DIRS[0]}: folder not found (nor {SEG_DIRS[1]}/); expected {LAYOUT}")


def require_all(paths: list[Path]) -> None:
    """DataError naming the first missing file (and how many are missing) before any feature is read."""
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: file not found ({len(missing)} of {len(paths)} feature/label files "
                        f"missing); expected {LAYOUT}")


def read_segment_labels(paths: list[Path]) -> np.ndarray:
    """The (N, 10) per-second event flags, each file checked for shape (1, 10) and 0/1 values."""
    flags = np.empty((len(paths), SEGMENTS), dtype=np.float32)
    for i, path in enumerate(paths):
        values = np.asarray(load_npy(path, shape=SEG_LABEL_SHAPE))
        if not np.isin(values, (0, 1)).all():
            raise DataError(f"{path}: segment labels {values.ravel().tolist()} must be 0 or 1")
        flags[i] = values[0]
    return flags


def normalised_audio(paths: list[Path]) -> tuple[np.ndarray, tuple[float, float]]:
    """The stacked audio features (N, 10, 128) float32, min-max normalised over the whole dataset."""
    audio = np.empty((len(paths), *AUDIO_SHAPE), dtype=np.float32)
    for i, path in enumerate(paths):
        audio[i] = checked(path, AUDIO_SHAPE)
    low, high = float(audio.min()), float(audio.max())
    return min_max(audio, low, high), (low, high)


def global_range(paths: list[Path], shape: tuple[int, ...]) -> tuple[float, float]:
    """The minimum and maximum over all files (first pass over the visual features; each file checked)."""
    low, high = np.inf, -np.inf
    for path in paths:
        values = checked(path, shape)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return low, high


def normalised_blocks(paths: list[Path], value_range: tuple[float, float], block_size: int) -> Iterator[np.ndarray]:
    """Consecutive float32 blocks of up to `block_size` clips, min-max normalised with `value_range`."""
    for start in range(0, len(paths), block_size):
        block = np.stack([checked(path, VISUAL_SHAPE) for path in paths[start:start + block_size]])
        yield min_max(block, *value_range)


def checked(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One feature file as float32, checked for shape and finite values."""
    values = np.asarray(load_npy(path, shape=shape), dtype=np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: contains NaN or infinite values; expected finite features")
    return values


def min_max(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(x - low) / (high - low) in float32; a constant modality maps to 0."""
    span = high - low
    return ((values - np.float32(low)) / np.float32(span if span > 0 else 1.0)).astype(np.float32, copy=False)


def optional_facts(root: Path) -> dict:
    """Class names (classes.txt) and the extraction summary (extraction.json) when they sit in `root`."""
    facts: dict = {}
    if (root / CLASSES_FILE).is_file():
        facts["class_names"] = [line for line in (root / CLASSES_FILE).read_text(encoding="utf-8").splitlines()
                                if line]
    if (root / EXTRACTION_FILE).is_file():
        try:
            facts["extraction"] = json.loads((root / EXTRACTION_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{root / EXTRACTION_FILE}: not valid JSON ({err}); expected the extraction "
                            "summary") from None
    return facts
