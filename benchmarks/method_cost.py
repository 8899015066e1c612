"""Cost of one training epoch and peak memory of every distillation method, against a plain student
epoch and KD, on AV-Digits-sized data (CPU or GPU).

    python -m benchmarks.method_cost [--methods ce kd mst ...] [--epochs 2] [--data data/av_digits]

Each method runs in its own forked process (CPU) so its peak memory can be read alone: the figure is
the growth of the process's peak resident memory (CPU; VmHWM after a reset) or of CUDA's peak
allocation over the state with the dataset already loaded. Times are per training epoch (gradient
steps only; validation excluded), mean over `--epochs` after one warm-up epoch; one-off work done in
earlier phases and the main phase's `before` (teacher caches, FitNets' hint phase, MGDFR's co-training
and salience) is reported apart.
`mst` is MST-Distill's phase 3 with its N = 4 specialised teachers (MaskNets at the params' hidden
factor) cached; `mst_uncached` re-runs every specialised teacher every batch, as the authors' code does.
Networks are randomly initialised: cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data.catalog import dataset_spec
from pipeline.data.tensors import DeviceDataset
from pipeline.methods import all_methods, method_class
from pipeline.methods.mst.method import MSTDistill
from pipeline.methods.mst.specialist_adaptation import SpecialistMasks
from pipeline.orchestration.config import Params, load_params
from pipeline.orchestration.runs import LoadedDataset, make_setup
from pipeline.training.engine import optimise_epoch, run_phase
from pipeline.training.phases import RunContext
from pipeline.training.runtime import resolve_device

PAIRS = [("m1", "mm"), ("m1", "cm"), ("m2", "mm"), ("m2", "cm"), ("m1", "mm+cm"), ("m2", "mm+cm")]


def synthetic_av_digits(n: int, size: int, device: torch.device) -> DeviceDataset:
    rng = np.random.default_rng(0)
    return DeviceDataset.from_arrays({"m1": rng.random((n, 1, 28, 28), dtype=np.float32),
                                      "m2": rng.random((n, 1, size, size), dtype=np.float32),
                                      "labels": np.arange(n) % 10}, device)


def _split(n: int, device: torch.device) -> dict[str, torch.Tensor]:
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    a, b = int(0.6 * n), int(0.8 * n)
    return {"train": index[:a], "val": index[a:b], "test": index[b:]}


def build_method(name: str, params: Params, loaded: LoadedDataset, target: str, config: str):
    """The method for one (target, teacher config), with randomly initialised networks (public API only)."""
    spec = loaded.spec
    if name in ("mst", "mst_uncached"):
        mst = params.method("mst").with_topk(params.topk)
        networks = {role: loaded.role_network(role) for role in ("mm", "m1", "m2")}
        groups = MSTDistill.teacher_groups(mst, networks, target, loaded.data.batch(loaded.splits[0]["train"][:2]),
                                           spec.key)
        setup = make_setup(loaded, params, 0, method="mst", target=target, teacher_config="mm+cm", student=None,
                           phase="dynamic_distillation", setting="full", method_params=mst,
                           restored={"networks": networks, "masks": SpecialistMasks(groups)})
        return MSTDistill.from_setup(dataclasses.replace(setup, cache_frozen_outputs=name == "mst"))
    role = "mm" if config == "mm" else spec.other(target) if config == "cm" else None
    setup = make_setup(loaded, params, 0, method=name, target=target, teacher_config=config,
                       student=loaded.role_network(target), teacher=loaded.role_network(role) if role else None)
    return method_class(name).from_setup(setup)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(name: str, params: Params, loaded: LoadedDataset, target: str, config: str, epochs: int) -> dict:
    """Epoch time, one-off prepare time and peak memory growth of one method."""
    device = loaded.data.device
    cfg = params.training[loaded.spec.key]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        base = _rss_kib("VmRSS") * 1024
    torch.manual_seed(0)
    method = build_method(name, params, loaded, target, config).to(device)
    context = RunContext(loaded.data, loaded.splits[0], cfg.batch_size, cfg.epochs, cfg.lr, loaded.spec.num_classes,
                         torch.Generator().manual_seed(0), eval_batch_size=cfg.batch_size)
    phases = method.phases(context)
    main = phases[-1]
    start = time.perf_counter()
    for phase in phases[:-1]:  # one-off: FitNets' hint phase, MGDFR's co-training
        run_phase(phase, context)
    if main.before is not None:  # caches, MGDFR's salience
        main.before()
    prepare_s = time.perf_counter() - start
    optimizer = main.optimizer()
    times = []
    for epoch in range(epochs + 1):
        for module in main.train_modules:
            module.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimise_epoch(lambda batch: main.loss_terms(batch, epoch), context.batches("train", shuffle=True),
                       optimizer, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024) - base
    return {"method": name, "target": target, "teacher": config, "epoch_s": float(np.mean(times[1:])),
            "prepare_s": prepare_s, "peak_mb": peak / 2**20}


def _in_child(i: int) -> dict:
    torch.set_num_threads(_STATE["threads"])
    return measure(*_STATE["jobs"][i])


_STATE: dict = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None, help="default: ce, every registered method, mst, "
                                                             "mst_uncached")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=2000, help="synthetic samples (AV-Digits default: 2000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args()
    params = load_params(args.params, restrict=False)
    device = resolve_device(args.device)
    torch.set_num_threads(params.threads_per_run)
    size = params.av_digits.spectrogram_size
    data = synthetic_av_digits(args.samples, size, device)
    loaded = LoadedDataset(dataset_spec("av_digits"), data, {0: _split(args.samples, device)})
    names = args.methods or [*(c.name for c in all_methods() if c.name != "mst"), "mst", "mst_uncached"]
    jobs = []
    for name in names:
        configs = (("mm+cm",) if name.startswith("mst") else ("none",) if name == "ce"
                   else tuple(getattr(params.method(name), "teachers", method_class(name).teacher_configs)))
        jobs += [(name, params, loaded, target, config, args.epochs) for target in ("m1", "m2") for config in configs]
    print(f"device {device}, torch threads {params.threads_per_run}, {args.samples} samples "
          f"({len(loaded.splits[0]['train'])} train), spectrogram {size}×{size}, batch "
          f"{params.training['av_digits'].batch_size}, {args.epochs} timed epochs after 1 warm-up")
    if device.type == "cpu":
        _STATE.update(threads=params.threads_per_run, jobs=jobs)  # inherited by the forked children
        context = multiprocessing.get_context("fork")
        results = []
        for i in range(len(jobs)):  # one fresh process per measurement, one at a time: clean peaks, no contention
            with context.Pool(1) as pool:
                results.append(pool.apply(_in_child, (i,)))
    else:
        results = [measure(*job) for job in jobs]
    plain = {r["target"]: r for r in results if r["method"] == "ce"}
    kd = {(r["target"], r["teacher"]): r for r in results if r["method"] == "kd"}
    print(f"\n{'method':13s} {'target':6s} {'teacher':7s} {'epoch s':>8s} {'× plain':>8s} {'prepare s':>9s} "
          f"{'peak MB':>8s} {'× KD mem':>8s}")
    for r in results:
        ratio = r["epoch_s"] / plain[r["target"]]["epoch_s"] if r["target"] in plain else float("nan")
        ref = kd.get((r["target"], r["teacher"])) or kd.get((r["target"], "mm"))
        mem = r["peak_mb"] / ref["peak_mb"] if ref and ref["peak_mb"] > 0 else float("nan")
        print(f"{r['method']:13s} {r['target']:6s} {r['teacher']:7s} {r['epoch_s']:8.3f} {ratio:8.2f} "
              f"{r['prepare_s']:9.2f} {r['peak_mb']:8.1f} {mem:8.2f}")


if __name__ == "__main__":
    main()
