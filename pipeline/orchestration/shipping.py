"""Jobs as bytes for processes that share no memory with the stage (spawned workers, Ray tasks), with the big
objects they close over (the loaded dataset) shipped once per worker or node instead of once per job.

A stage's jobs are closures over its `LoadedDataset`. Pickling each closure whole would copy the dataset into
every job. Instead, `pack` pickles a job with cloudpickle and replaces every shared object it meets (by type)
with a small key (pickle's persistent-id mechanism); the objects themselves travel once, by whatever channel the
executor has (a spawned worker's pipe, where torch moves tensors to shared memory or CUDA IPC; Ray's object
store, one copy per node), and `unpack` resolves the keys against what the worker already holds.
"""

from __future__ import annotations

import io
import pickle
from collections import ChainMap
from collections.abc import Callable, Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle


class SharedObjects:
    """The shared objects met while packing jobs, by key (one key per distinct object)."""

    def __init__(self, shared_types: tuple[type, ...]) -> None:
        self.shared_types = shared_types
        self.objects: dict[str, Any] = {}
        self._keys: dict[int, str] = {}

    def key_of(self, obj: Any) -> str | None:
        if not isinstance(obj, self.shared_types):
            return None
        key = self._keys.get(id(obj))
        if key is None:
            key = self._keys[id(obj)] = f"shared{len(self._keys)}"
            self.objects[key] = obj
        return key


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file, shared: SharedObjects) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._shared = shared
        self.used: list[str] = []

    def persistent_id(self, obj: Any) -> str | None:
        key = self._shared.key_of(obj)
        if key is not None and key not in self.used:
            self.used.append(key)
        return key


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, resolve: Callable[[str], Any]) -> None:
        super().__init__(file)
        self._resolve = resolve

    def persistent_load(self, key: str) -> Any:
        return self._resolve(key)


def pack(job: Any, shared: SharedObjects) -> tuple[bytes, list[str]]:
    """The job as bytes (cloudpickle) with every shared object replaced by its key; the keys it needs."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, shared)
    pickler.dump(job)
    return buffer.getvalue(), pickler.used


def dumps_for_worker(obj: Any) -> bytes:
    """`obj` as bytes for a worker process on this machine: cloudpickle (closures, lambdas in dataclasses) with
    the reducers multiprocessing uses for process-to-process transfer, so torch tensors travel as handles to
    shared memory (CPU) or CUDA IPC (GPU) instead of copies. The sender must outlive the receiver's load."""
    import torch.multiprocessing  # noqa: F401 (registers torch's tensor reducers with ForkingPickler)

    buffer = io.BytesIO()
    pickler = cloudpickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = ChainMap(ForkingPickler._extra_reducers, pickler.dispatch_table)
    pickler.dump(obj)
    return buffer.getvalue()


def unpack(data: bytes, held: Mapping[str, Any] | Callable[[str], Any]) -> Any:
    """The job packed by `pack`, its shared objects taken from `held` (a mapping, or a key → object function).
    Only ever called on bytes this project's own stage process just packed (never on a file)."""
    resolve = held if callable(held) else held.__getitem__
    return _Unpickler(io.BytesIO(data), resolve).load()
