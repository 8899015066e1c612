"""Device choice and seeding."""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import torch

from pipeline.params import ParamsError


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; otherwise the named device (which must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"params.yaml: device: {name!r} requested but CUDA is not available on this machine; "
                          "use device: auto (CUDA when present, else CPU) or device: cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ParamsError(f"params.yaml: device: {name!r} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s); use cuda:0..{torch.cuda.device_count() - 1}")
    return device


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with `deterministic`, ask torch for deterministic kernels
    (warn-only, since a few CUDA backward kernels have no deterministic version)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class PeakMemory:
    """Peak memory of the code run inside `with PeakMemory(device) as meter:`, in MiB, as `meter.peak_mb`:
    CUDA's peak allocation above what was allocated at entry, or on a CPU the growth of the process's
    resident set over its size at entry, taken as the larger of the kernel's high-water mark (VmHWM,
    reset at entry through /proc/self/clear_refs) and a resident size sampled every `sample_s` seconds.
    None where the platform offers neither (the figure is informative, never required)."""

    def __init__(self, device: torch.device, sample_s: float = 0.01) -> None:
        self.device = device
        self.sample_s = sample_s
        self.peak_mb: float | None = None
        self._base: int | None = None
        self._sampled = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            self._base = _status_kib("VmRSS") * 1024
        except OSError:
            return self
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current resident size
        except OSError:
            pass  # the sampler alone then measures
        # Some kernels and sandboxes accept the reset but keep no real high-water mark (seen on CI:
        # VmHWM equal to the resident size at exit), so a sampler backs the kernel's figure up.
        self._sampled = self._base
        self._sampler = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_s):
            try:
                self._sampled = max(self._sampled, _status_kib("VmRSS") * 1024)
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._sampler is not None:
                self._sampler.join()
            peak = self._sampled
            try:
                peak = max(peak, _status_kib("VmHWM") * 1024, _status_kib("VmRSS") * 1024)
            except OSError:
                pass
        self.peak_mb = round(max(peak - self._base, 0) / 2**20, 1)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")
