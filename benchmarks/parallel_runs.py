"""Throughput of one stage's independent runs under each executor, against one at a time, interleaved so that
machine noise hits every mode alike.

    python -m benchmarks.parallel_runs [--seeds 0 1] [--repeats 2] [--modes serial local ray]
        [--runs-per-gpu 2 4] [--prepared data/prepared/av_digits] [--device auto]

The runs are the teachers stage's (per seed: the multimodal and both unimodal networks, default params), with
nothing saved to the real models folder and nothing tracked. Modes: `serial` (one after another in this
process), `local` (worker processes: forked, one per core, on a CPU; on a GPU spawned and packed K per device,
once per `--runs-per-gpu` K), `ray` (one Ray task per run on a private local instance, started once before
timing). Prints runs per second, the ratio to serial, and the mean peak memory per run (GPU memory on CUDA).
Needs the prepared data (`dvc repro prepare@av_digits`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.orchestration.config import load_params
from pipeline.orchestration.executors import local_ray_environment
from pipeline.orchestration.jobs import open_device
from pipeline.orchestration.runs import load_dataset
from pipeline.orchestration.teachers import train_teachers
from pipeline.tracking.base import NullTracker


def _modes(names: list[str], device_type: str, packings: list[int], executor) -> dict[str, tuple[int, object]]:
    """mode name -> (workers, executor params)."""
    modes = {}
    for name in names:
        if name == "serial":
            modes["serial"] = (1, dataclasses.replace(executor, kind="local", runs_per_gpu=1))
        elif name == "local" and device_type == "cuda":
            for k in packings:
                modes[f"local, {k} per GPU"] = (0, dataclasses.replace(executor, kind="local", runs_per_gpu=k))
        elif name == "local":
            modes["local"] = (0, dataclasses.replace(executor, kind="local"))
        elif name == "ray":
            modes["ray"] = (0, dataclasses.replace(executor, kind="ray"))
    return modes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["serial", "local", "ray"], choices=["serial", "local", "ray"])
    p.add_argument("--runs-per-gpu", type=int, nargs="+", default=[2, 4])
    p.add_argument("--prepared", type=Path, default=Path("data/prepared/av_digits"))
    p.add_argument("--device", default=None, help="default: params.yaml's")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args()
    params = load_params(args.params, restrict=False)
    params = dataclasses.replace(params, seeds=args.seeds, device=args.device or params.device)
    device = open_device(params)
    loaded = load_dataset(params, "av_digits", args.prepared, device)
    modes = _modes(args.modes, device.type, args.runs_per_gpu, params.executor)
    if "ray" in modes:
        local_ray_environment(os.environ)
        import ray

        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    peaks: dict[str, list[float]] = {mode: [] for mode in modes}
    n_runs = 0
    for _ in range(args.repeats):
        for mode, (workers, executor) in modes.items():
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                records = train_teachers(dataclasses.replace(params, workers=workers, executor=executor), loaded,
                                         Path(tmp), NullTracker())
                times[mode].append(time.perf_counter() - start)
            n_runs = len({r.run_name for r in records})
            peaks[mode] += [r.cost["peak_mb"] for r in records if r.cost.get("peak_mb")]
    serial = statistics.mean(times.get("serial") or next(iter(times.values())))
    print(f"teachers stage on {device} ({loaded.spec.display_name}), seeds {args.seeds}: {n_runs} runs, "
          f"{args.repeats} interleaved repeats, {params.threads_per_run} torch thread(s) per run, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'mode':22s} {'wall s per repeat':>24s} {'runs/s':>8s} {'× serial':>9s} {'peak MB/run':>12s}")
    for mode, values in times.items():
        mean = statistics.mean(values)
        peak = f"{statistics.mean(peaks[mode]):.0f}" if peaks[mode] else "-"
        print(f"{mode:22s} {' '.join(f'{t:6.1f}' for t in values):>24s} {n_runs / mean:8.3f} {serial / mean:9.2f} "
              f"{peak:>12s}")


if __name__ == "__main__":
    main()
