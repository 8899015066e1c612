"""What every extraction stage shares: the run settings, pretrained-weight files found locally (or a one-line
error naming the file, where to put it and its checksum), a progress bar, a per-item resume cache, and an
atomic output folder.

An extraction stage turns a dataset's raw files (as its publishers distribute them) into the files the
authors' loaders read (their preprocessed layout); the prepare stage then turns those into the prepared
tensors. Extraction never downloads anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.validation import DataError
from pipeline.errors import UserError
from pipeline.extraction.settings import ExtractRuntime  # noqa: F401 - re-exported: the extractors' runtime

SUMMARY_FILE = "extraction.json"


class WeightsError(UserError):
    """A pretrained-weight file is missing or does not match; the message names the file, where to put it
    and the checksum expected."""


@dataclass(frozen=True)
class WeightFile:
    """A published weight file: its file name, the sha256 prefix its publisher puts in the name (torchvision and
    torch.hub check exactly this prefix), and where the publisher hosts it (to tell the user, never fetched)."""

    filename: str
    sha256_prefix: str
    source: str
    purpose: str


def weight_search_paths(filename: str, weights_dir: str | Path) -> list[Path]:
    """Where a weight file is looked for, in order: the project's weights folder, then torch.hub's cache
    ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints)."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return [Path(weights_dir) / filename, torch_home / "hub" / "checkpoints" / filename]


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_weights(weight: WeightFile, weights_dir: str | Path) -> Path:
    """The local path of `weight`, checked against its sha256 prefix; WeightsError (one line) when absent or
    different."""
    candidates = weight_search_paths(weight.filename, weights_dir)
    for path in candidates:
        if path.is_file():
            digest = sha256_of(path)
            if not digest.startswith(weight.sha256_prefix):
                raise WeightsError(f"{path}: sha256 {digest[:12]}… does not start with {weight.sha256_prefix} "
                                   f"(the publisher's checksum for {weight.filename}); replace it with the file "
                                   f"from {weight.source}")
            return path
    raise WeightsError(f"{weight.filename} not found ({weight.purpose}): place it at {candidates[0]} (or "
                       f"{candidates[1]}); get it from {weight.source}; its sha256 starts with "
                       f"{weight.sha256_prefix}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weight file's tensors, read without unpickling code (weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # noqa: BLE001 - any failure to read is the file's fault
        raise WeightsError(f"{path}: not a readable PyTorch state dict ({type(err).__name__}: {err}); replace "
                           "the file") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def progress(items: Iterable[Any], total: int | None, desc: str, enabled: bool = True) -> Iterator[Any]:
    """Yield `items`, drawing a progress bar on stderr (tqdm) with throughput; plain iteration when disabled."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm
    yield from tqdm(items, total=total, desc=desc, unit="item", file=sys.stderr, mininterval=2.0,
                    dynamic_ncols=True)


class ItemCache:
    """Resume cache for per-item extraction results (one `.npz` per item, written atomically), keyed by the
    item's name and a fingerprint of everything its result depends on (raw file size and mtime, settings).
    A re-run after a crash or interruption redoes only the missing items; changed settings miss the cache."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.root = Path(root) / self.settings_key
        self.hits = 0
        self.misses = 0

    @staticmethod
    def file_fingerprint(*paths: Path) -> str:
        parts = []
        for path in paths:
            stat = Path(path).stat()
            parts.append(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def _path(self, name: str, fingerprint: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.root / f"{safe}.{fingerprint}.npz"

    def get(self, name: str, fingerprint: str) -> dict[str, np.ndarray] | None:
        path = self._path(name, fingerprint)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                result = {key: data[key] for key in data.files}
        except (ValueError, OSError, EOFError):
            path.unlink(missing_ok=True)      # a torn cache entry is recomputed, never trusted
            self.misses += 1
            return None
        self.hits += 1
        return result

    def put(self, name: str, fingerprint: str, arrays: dict[str, np.ndarray]) -> None:
        path = self._path(name, fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


class AtomicFolder:
    """An output folder written under `<out>.tmp` and renamed into place only when the block succeeds, so a
    failed extraction leaves no half-written output (the previous output, if any, is kept until then)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.tmp = self.out.with_name(self.out.name + ".tmp")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        shutil.rmtree(self.out, ignore_errors=True)
        os.replace(self.tmp, self.out)


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    (Path(folder) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")


class Stopwatch:
    """Wall time and items per second of an extraction, for its summary."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def report(self, items: int) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        return {"seconds": round(seconds, 3), "items_per_second": round(items / seconds, 3) if seconds else 0.0}


def require_file(path: Path, what: str) -> Path:
    """`path` if it is a file, else DataError naming it and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected {what}")
    return path
