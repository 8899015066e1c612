"""Per-epoch training time of every network of AV-MNIST, RAVDESS, VGGSound-50k, CrisisMMD-V2 and NYU-Depth-V2 at
the real input shapes (synthetic tensors), for w/o KD (CE), KD (MM teacher) and MST-Distill phase 3, on the CPU
or a GPU.

    python -m benchmarks.dataset_epoch_time [--datasets av_mnist ravdess vggsound50k crisismmd_v2 nyu_depth_v2]
        [--batch 0 [ravdess=8 ...]] [--steps 2 [nyu_depth_v2=1 ...]] [--methods ce kd mst]
        [--teacher-configs first] [--skip DATASET:METHOD ...] [--device auto] [--json OUT]

Each measurement trains on a synthetic dataset of the real per-sample shapes holding `steps` training batches
(default 2), times one epoch after a warm-up epoch (gradient steps only; validation and one-off teacher caching
excluded, as benchmarks/method_cost.py), and scales the time per sample to the real training split (60 % of
70,000 / 1,440 / 50,543 / 16,058 / 1,449 samples). `--batch 0` measures at the paper's batch size (512 / 32 / 512 /
512 / 6); a smaller `--batch` (e.g. 32 on a CPU, where a 512-batch VGGSound step takes minutes) scales the
per-sample time, which is close to linear in the batch on a CPU and is a lower bound on a GPU (larger batches use
it better). `--batch` and `--steps` take one value for every dataset and `dataset=value` overrides, e.g.
`--batch 0 ravdess=8 --steps 2 nyu_depth_v2=1`. `--teacher-configs all` measures every teacher configuration a
method's params list (KD: MM and CM); `first` (default) only the first (KD: MM; a cached CM teacher costs the
same per epoch). `--skip ravdess:mst` leaves one (dataset, method) out (a measurement too large or too slow for
the machine); the JSON lists it as skipped. `--json OUT` writes every printed measurement with the machine it
ran on (benchmarks/grid_cost.py reads it). Networks are randomly initialised: cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.method_cost import _split, measure
from pipeline.data.catalog import dataset_spec
from pipeline.data.tensors import DeviceDataset
from pipeline.io import write_json
from pipeline.methods import method_class
from pipeline.orchestration.config import load_params
from pipeline.orchestration.runs import LoadedDataset
from pipeline.training.runtime import resolve_device

# AV-MNIST: image 1×28×28, spectrogram 1×112×112 (the catalog's loader reads S = 112)
SHAPES = {"av_mnist": ((1, 28, 28), (1, 112, 112)),
          "ravdess": ((15, 3, 224, 224), (15, 156)), "vggsound50k": ((10, 7, 7, 512), (10, 128)),
          "crisismmd_v2": ((2048,), (768,)), "nyu_depth_v2": ((3, 480, 640), (1, 480, 640))}
SIZES = {"av_mnist": 70_000, "ravdess": 1440, "vggsound50k": 50_543, "crisismmd_v2": 16_058,  # authors' loaders
         "nyu_depth_v2": 1449}                                       # (AV-MNIST: train + test concatenated)
TRAIN_FRACTION = 0.6


def synthetic(dataset: str, n: int, device: torch.device, params) -> LoadedDataset:
    """A random dataset of `n` samples at `dataset`'s real per-sample shapes (segmentation: random label maps,
    void included), one split, its FuseNets at the params' width."""
    spec = dataset_spec(dataset)
    rng = np.random.default_rng(0)
    m1, m2 = (rng.random((n, *shape), dtype=np.float32) for shape in SHAPES[dataset])
    labels = (rng.integers(0, spec.num_classes, size=(n, *SHAPES[dataset][0][1:])) if spec.task == "segmentation"
              else np.arange(n) % spec.num_classes)
    data = DeviceDataset.from_arrays({"m1": m1, "m2": m2, "labels": labels}, device, ignore_label=spec.ignore_label)
    options = params.fusenet.options(dataset) if spec.task == "segmentation" else {}
    return LoadedDataset(spec, data, {0: _split(n, device)}, options)


def per_dataset(values: list[str], option: str, datasets: list[str]) -> dict[str, int]:
    """`--batch`/`--steps` values, one whole number for every dataset followed by `dataset=N` overrides, as a
    value per dataset; SystemExit naming the option and the bad value."""
    default, out = None, {}
    for value in values:
        key, _, number = value.rpartition("=")
        if not number.isdigit() or (key and key not in datasets):
            raise SystemExit(f"{option} {value}: expected a whole number or dataset=N with dataset one of "
                             f"{', '.join(datasets)}")
        if key:
            out[key] = int(number)
        elif default is None:
            default = int(number)
        else:
            raise SystemExit(f"{option} {value}: a second value for every dataset; use dataset={value}")
    return {d: out.get(d, default if default is not None else 0) for d in datasets}


def teacher_configs(params, method: str, which: str) -> tuple[str, ...]:
    """The teacher configurations measured for `method`: its params' `teachers` (or the class's), all or the first."""
    if method == "ce":
        return ("none",)
    if method.startswith("mst"):
        return ("mm+cm",)
    configs = tuple(getattr(params.method(method), "teachers", method_class(method).teacher_configs))
    return configs if which == "all" else configs[:1]


def machine(device: torch.device) -> dict:
    """Where the measurements ran: device, its model, torch version, threads, CPU model and the date (UTC)."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    return {"device": str(device), "gpu_model": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_model": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.dataset_epoch_time", *sys.argv[1:]])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=["ce", "kd", "mst"])
    p.add_argument("--batch", nargs="+", default=["0"], help="measurement batch (0: the paper's); dataset=N overrides")
    p.add_argument("--steps", nargs="+", default=["2"], help="training batches per timed epoch; dataset=N overrides")
    p.add_argument("--teacher-configs", choices=["first", "all"], default="first")
    p.add_argument("--skip", nargs="+", default=[], metavar="DATASET:METHOD", help="(dataset, method) not measured")
    p.add_argument("--device", default="auto")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    args = p.parse_args()
    batches = per_dataset(args.batch, "--batch", list(SHAPES))
    steps = per_dataset(args.steps, "--steps", list(SHAPES))
    if any(steps[d] < 1 for d in args.datasets):
        raise SystemExit("--steps: expected at least 1 training batch per dataset")
    skipped = [tuple(item.split(":", 1)) for item in args.skip]
    for item, pair in zip(args.skip, skipped):
        if len(pair) != 2 or pair[0] not in args.datasets or pair[1] not in args.methods:
            raise SystemExit(f"--skip {item}: expected DATASET:METHOD with a dataset of --datasets "
                             f"({', '.join(args.datasets)}) and a method of --methods ({', '.join(args.methods)})")
    params = load_params(args.params, restrict=False)
    device = resolve_device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    torch.set_flush_denormal(params.engine.flush_denormal)
    host = machine(device)
    print(f"device {device} ({host['gpu_model'] or 'CPU ' + host['cpu_model']}), torch {torch.__version__}, "
          f"{host['threads']} threads")
    print(f"{'dataset':13s} {'method':5s} {'target':6s} {'network':24s} {'batch':>5s} {'s/sample':>9s} "
          f"{'epoch s (real N)':>16s} {'peak MB':>8s}")
    rows = []
    for dataset in args.datasets:
        spec = dataset_spec(dataset)
        paper_batch = params.training[dataset].batch_size
        batch = batches[dataset] or paper_batch
        training = dict(params.training)
        training[dataset] = dataclasses.replace(params.training[dataset], batch_size=batch)
        run_params = dataclasses.replace(params, training=training, topk=params.topk)
        n = math.ceil(steps[dataset] * batch / TRAIN_FRACTION)
        loaded = synthetic(dataset, n, device, params)
        train_n = len(loaded.splits[0]["train"])
        real_train = int(TRAIN_FRACTION * SIZES[dataset])
        for method in (m for m in args.methods if (dataset, m) not in skipped):
            for target in (("mm", "m1", "m2") if method == "ce" else ("m1", "m2")):
                for config in teacher_configs(params, method, args.teacher_configs):
                    start = time.perf_counter()
                    result = measure(method, run_params, loaded, target, config, epochs=1)
                    wall = time.perf_counter() - start
                    per_sample = result["epoch_s"] / train_n
                    print(f"{dataset:13s} {method:5s} {spec.modality_name(target)[:6]:6s} "
                          f"{spec.networks[target]:24s} {batch:5d} {per_sample:9.5f} {per_sample * real_train:16.1f} "
                          f"{result['peak_mb']:8.0f}   (measured in {wall:.0f} s)", flush=True)
                    rows.append({"dataset": dataset, "role": target, "network": spec.networks[target],
                                 "modality": spec.modality_name(target), "method": method, "teacher": config,
                                 "batch": batch, "paper_batch": paper_batch, "train_samples": train_n,
                                 "s_per_sample": per_sample, "real_train_samples": real_train,
                                 "epoch_s": per_sample * real_train, "peak_mb": result["peak_mb"],
                                 "prepare_s": result["prepare_s"], "measured_in_s": wall})
        del loaded
        if args.json is not None:  # after every dataset: a later crash keeps what was measured
            write_json(args.json, {"machine": host, "datasets": args.datasets, "methods": args.methods,
                                   "skipped": [{"dataset": d, "method": m} for d, m in skipped],
                                   "measurements": rows})


if __name__ == "__main__":
    main()
