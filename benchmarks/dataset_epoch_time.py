"""Per-epoch training time of every network of RAVDESS, VGGSound-50k, CrisisMMD-V2 and NYU-Depth-V2 at the real
input shapes (synthetic tensors), for w/o KD (CE), KD (MM teacher) and MST-Distill phase 3, on the CPU or a GPU.

    python -m benchmarks.dataset_epoch_time [--datasets ravdess vggsound50k crisismmd_v2 nyu_depth_v2]
        [--batch 0] [--methods ce kd mst] [--device auto]

Each measurement trains on a synthetic dataset of the real per-sample shapes holding `steps` training batches
(default 2), times one epoch after a warm-up epoch (gradient steps only; validation and one-off teacher caching
excluded, as benchmarks/method_cost.py), and scales the time per sample to the real training split (60 % of
1,440 / 50,543 / 16,058 / 1,449 samples). `--batch 0` measures at the paper's batch size (32 / 512 / 512 / 6); a smaller
`--batch` (e.g. 32 on a CPU, where a 512-batch VGGSound step takes minutes) scales the per-sample time, which
is close to linear in the batch on a CPU and is a lower bound on a GPU (larger batches use it better).
Networks are randomly initialised: cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch

from benchmarks.method_cost import _split, measure
from pipeline.data.catalog import dataset_spec
from pipeline.data.tensors import DeviceDataset
from pipeline.orchestration.config import load_params
from pipeline.orchestration.runs import LoadedDataset
from pipeline.training.runtime import resolve_device

SHAPES = {"ravdess": ((15, 3, 224, 224), (15, 156)), "vggsound50k": ((10, 7, 7, 512), (10, 128)),
          "crisismmd_v2": ((2048,), (768,)), "nyu_depth_v2": ((3, 480, 640), (1, 480, 640))}
SIZES = {"ravdess": 1440, "vggsound50k": 50_543, "crisismmd_v2": 16_058, "nyu_depth_v2": 1449}   # authors' loaders


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=["ce", "kd", "mst"])
    p.add_argument("--batch", type=int, default=0, help="measurement batch (0: the paper's)")
    p.add_argument("--steps", type=int, default=2, help="training batches per timed epoch")
    p.add_argument("--device", default="auto")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args()
    params = load_params(args.params, restrict=False)
    device = resolve_device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    torch.set_flush_denormal(params.engine.flush_denormal)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dataset':13s} {'method':5s} {'target':6s} {'network':24s} {'batch':>5s} {'s/sample':>9s} "
          f"{'epoch s (real N)':>16s} {'peak MB':>8s}")
    for dataset in args.datasets:
        spec = dataset_spec(dataset)
        paper_batch = params.training[dataset].batch_size
        batch = args.batch or paper_batch
        training = dict(params.training)
        training[dataset] = dataclasses.replace(params.training[dataset], batch_size=batch)
        run_params = dataclasses.replace(params, training=training, topk=params.topk)
        n = math.ceil(args.steps * batch / 0.6)
        loaded = synthetic(dataset, n, device, params)
        train_n = len(loaded.splits[0]["train"])
        real_train = int(0.6 * SIZES[dataset])
        for method in args.methods:
            for target in (("mm", "m1", "m2") if method == "ce" else ("m1", "m2")):
                config = "mm+cm" if method == "mst" else "none" if method == "ce" else "mm"
                start = time.perf_counter()
                result = measure(method, run_params, loaded, target, config, epochs=1)
                per_sample = result["epoch_s"] / train_n
                print(f"{dataset:13s} {method:5s} {spec.modality_name(target)[:6]:6s} {spec.networks[target]:24s} "
                      f"{batch:5d} {per_sample:9.5f} {per_sample * real_train:16.1f} {result['peak_mb']:8.0f}"
                      f"   (measured in {time.perf_counter() - start:.0f} s)", flush=True)
        del loaded


if __name__ == "__main__":
    main()
