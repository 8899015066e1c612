"""Run-level resume: the finished runs of a stage attempt that did not complete, kept until the stage completes.

DVC caches whole stages: a stage killed after k of its n runs would train all n again. Each run that finishes
is therefore written at once under `<root>/.run_cache/<stage id>/<key>/` (root: DVC's `DVC_ROOT`, else the
current directory) with everything the stage needs from it: its result records, the MLflow runs it recorded (replayed
again, with their real times, into the next attempt) and copies of the files it wrote (checkpoints; DVC deletes
a stage's outputs before running it). The next attempt takes those runs from the cache and trains the others.

Entries are keyed by everything that determines a run: the whole params file, the code (every .py file under
pipeline/ and stages/), torch's version, the run device, the stage's input files and folders, and the job's
name (which holds its seed and configuration). Input files are hashed by content up to `CONTENT_HASH_BYTES`;
a larger one (prepared video: 13-50 GB, which would take minutes per stage) by its size and modification time,
which any rewrite changes (a restore from DVC's cache too: that only costs a retraining, never a wrong reuse).
A stage discards the folders of other keys that no live attempt holds (see RunCache) before training; a stage
that completed removes its entries. Reading an entry parses JSON and copies files: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.io import project_root
from pipeline.orchestration.runs import RunRecord
from pipeline.tracking.recording import RecordedRun

CACHE_DIR = ".run_cache"
CONTENT_HASH_BYTES = 256 << 20
_CODE_DIRS = ("pipeline", "stages")


def _hash_file(digest, path: Path) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)


def tree_hash(paths: Iterable[Path], content_limit: int = CONTENT_HASH_BYTES) -> str:
    """sha256 over the relative names and contents of every file under `paths` (files or folders), in order (a
    file over `content_limit` bytes: its size and modification time); a path that does not exist hashes as
    absent."""
    digest = hashlib.sha256()
    for top in paths:
        top = Path(top)
        digest.update(f"<{top}>".encode())
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.exists() else []
        for path in files:
            digest.update(f"{path.relative_to(top) if path != top else ''}\0".encode())
            stat = path.stat()
            if stat.st_size > content_limit:
                digest.update(f"size {stat.st_size} mtime {stat.st_mtime_ns}".encode())
            else:
                _hash_file(digest, path)
    return digest.hexdigest()


def code_hash(repo: Path | None = None) -> str:
    """sha256 of every .py file under pipeline/ and stages/ of the repository this module belongs to."""
    repo = repo or Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for folder in _CODE_DIRS:
        for path in sorted((repo / folder).rglob("*.py")):
            digest.update(f"{path.relative_to(repo)}\0".encode())
            _hash_file(digest, path)
    return digest.hexdigest()


def stage_fingerprint(params_text: str, inputs: Sequence[Path], device: str) -> str:
    """The key of one stage attempt's runs: params, code, torch version, device and input data."""
    import torch

    parts = {"params": hashlib.sha256(params_text.encode()).hexdigest(), "code": code_hash(),
             "torch": torch.__version__, "device": device, "inputs": tree_hash(inputs)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def encode_result(result: Any) -> Any:
    """A job's result (a RunRecord, or a list of them) as JSON."""
    if isinstance(result, RunRecord):
        return {"record": dataclasses.asdict(result)}
    if isinstance(result, list) and all(isinstance(r, RunRecord) for r in result):
        return {"records": [dataclasses.asdict(r) for r in result]}
    raise TypeError(f"the run cache stores RunRecord results, not {type(result).__name__}")


def decode_result(data: dict) -> Any:
    if "record" in data:
        return RunRecord(**data["record"])
    return [RunRecord(**r) for r in data["records"]]


@dataclasses.dataclass
class CachedRun:
    result: Any
    runs: list[RecordedRun]
    seconds: float


class RunCacheBusy(Exception):
    """Another live attempt of the same stage with the same key holds its run cache."""


class RunCache:
    """The finished runs of one stage (`stage_id`, e.g. `distill@av_digits-kd`) under `fingerprint`, in
    `<root>/<stage id>/<fingerprint>/`. An attempt holds that folder's lock while it runs (released by the kernel
    if it dies), so concurrent attempts with other keys (`dvc exp run --queue` workers with other params) never
    touch each other's entries; the folders of other keys that no live attempt holds are discarded."""

    def __init__(self, stage_id: str, fingerprint: str, root: Path | None = None) -> None:
        import filelock

        stage_folder = (root or project_root() / CACHE_DIR) / stage_id.replace("/", "_")
        stage_folder.mkdir(parents=True, exist_ok=True)
        key = fingerprint[:32]
        self.stage_folder, self.folder, self.fingerprint = stage_folder, stage_folder / key, fingerprint
        self._lock = filelock.FileLock(str(stage_folder / f"{key}.lock"))
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise RunCacheBusy(f"{self.folder} is in use by another attempt of {stage_id} with the same "
                               "params, code and data") from None
        for other in stage_folder.iterdir():
            if other.is_dir() and other.name != key:   # params, code or data changed: not these runs
                lock = filelock.FileLock(str(stage_folder / f"{other.name}.lock"))
                try:
                    lock.acquire(timeout=0)
                except filelock.Timeout:
                    continue                           # a live attempt with another key
                shutil.rmtree(other, ignore_errors=True)
                lock.release()
                Path(lock.lock_file).unlink(missing_ok=True)
        self.folder.mkdir(exist_ok=True)

    def _entry(self, name: str) -> Path:
        return self.folder / hashlib.sha256(name.encode()).hexdigest()[:24]

    def get(self, name: str, outputs: Sequence[Path]) -> CachedRun | None:
        """The cached run of job `name`, its output files restored to `outputs`; None when absent."""
        entry = self._entry(name)
        if not (entry / "done").exists():
            return None
        meta = json.loads((entry / "entry.json").read_text())
        if meta["name"] != name or meta["outputs"] != [str(p) for p in outputs]:
            return None
        for i, path in enumerate(outputs):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry / f"output{i}", path)
        runs = [RecordedRun.from_json(r) for r in meta["runs"]]
        return CachedRun(decode_result(meta["result"]), runs, meta["seconds"])

    def put(self, name: str, result: Any, runs: Sequence[RecordedRun], outputs: Sequence[Path],
            seconds: float) -> None:
        """Keep one finished run (written to a temporary folder, then renamed: an entry is whole or absent)."""
        entry = self._entry(name)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder))
        for i, path in enumerate(outputs):
            shutil.copyfile(path, tmp / f"output{i}")
        meta = {"name": name, "outputs": [str(p) for p in outputs], "result": encode_result(result),
                "runs": [r.to_json() for r in runs], "seconds": seconds}
        (tmp / "entry.json").write_text(json.dumps(meta, default=str))
        (tmp / "done").write_text("")
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)

    def clear(self) -> None:
        """Forget this attempt's runs (the stage completed: DVC holds its outputs now) and release the folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.release()
        try:
            self.stage_folder.rmdir()        # only when no other key's folder is left
        except OSError:
            pass

    def release(self) -> None:
        """Let another attempt use (or discard) this key's folder."""
        if self._lock.is_locked:
            self._lock.release()
            Path(self._lock.lock_file).unlink(missing_ok=True)
