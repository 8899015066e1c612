"""Wall time of one stage's independent runs: serially, in reused worker processes (the pipeline's way),
and in a fresh worker process per run (`maxtasksperchild=1`), interleaved so machine noise hits every mode.

    python -m benchmarks.parallel_runs [--seeds 0 1] [--repeats 2] [--prepared data/prepared/av_digits]

The runs are the teachers stage's (per seed: the multimodal and both unimodal networks, default params),
with nothing saved to the real models folder and nothing tracked. Needs the prepared data (`dvc repro
prepare@av_digits`).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing.context
import tempfile
import time
from pathlib import Path

import torch

from pipeline.orchestration.config import load_params
from pipeline.orchestration.runs import load_dataset
from pipeline.orchestration.teachers import train_teachers
from pipeline.tracking.base import NullTracker

_POOL = multiprocessing.context.ForkContext.Pool


def _fresh_process_pool(self, *args, **kwargs):
    return _POOL(self, *args, **{**kwargs, "maxtasksperchild": 1})


MODES = {"serial": (1, _POOL), "reused workers": (0, _POOL), "fresh process per run": (0, _fresh_process_pool)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prepared", type=Path, default=Path("data/prepared/av_digits"))
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args()
    params = dataclasses.replace(load_params(args.params, restrict=False), seeds=args.seeds)
    torch.set_num_threads(params.threads_per_run)
    loaded = load_dataset(params, "av_digits", args.prepared, torch.device("cpu"))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, (workers, pool) in MODES.items():
            multiprocessing.context.ForkContext.Pool = pool
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    train_teachers(dataclasses.replace(params, workers=workers), loaded, Path(tmp), NullTracker())
                    times[mode].append(time.perf_counter() - start)
            finally:
                multiprocessing.context.ForkContext.Pool = _POOL
    reference = sum(times["reused workers"])
    print(f"teachers stage, seeds {args.seeds}, {args.repeats} interleaved repeats, "
          f"{params.threads_per_run} torch thread(s) per run")
    for mode, values in times.items():
        print(f"{mode:22s} {' '.join(f'{t:6.1f}' for t in values)} s   × reused: {sum(values) / reference:.2f}")


if __name__ == "__main__":
    main()
