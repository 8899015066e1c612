"""One run = one trained method: seeded, built, trained through the engine's phases, tracked as one
MLflow run, its checkpoints saved (atomic, weights-only) and its outcome returned as result records of
one schema. Every stage of the pipeline goes through `run_method`.
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.catalog import DatasetSpec, dataset_spec
from pipeline.data.prepared import SPLIT_FILE, read_prepared
from pipeline.data.splits import read_split_column, split_positions
from pipeline.data.tensors import DeviceDataset
from pipeline.io import write_json
from pipeline.methods import DistillationMethod, MethodSetup, method_class
from pipeline.models.registry import Network, build_network, takes_options
from pipeline.orchestration.config import Params
from pipeline.orchestration.progress import EpochProgress
from pipeline.params import ParamsError
from pipeline.reporting.figures import confusion_matrix_png, routing_curves_png
from pipeline.tracking.base import Tracker
from pipeline.training.checkpoints import save_checkpoint, save_module_state
from pipeline.training.engine import STOP_NON_FINITE, TrainResult, train
from pipeline.training.health import assess
from pipeline.training.phases import RunContext
from pipeline.training.runtime import PeakMemory, seed_everything
from pipeline.training.settings import TrainingParams

ROLES = ("mm", "m1", "m2")


@dataclass(frozen=True)
class RunRecord:
    """One trained network's outcome, as stored in results/<dataset>/<file>.json (one schema for every
    stage and method). `target` is the network's modality name ("image", "audio", or "multimodal");
    `setting` names a variant (teachers stage: "teacher" or "wo_kd"; MST-Distill: its Table 3 setting);
    `curve` holds the per-epoch training loss and validation metrics of the run's last phase; `epochs`
    the epochs that phase ran (of `max_epochs`) and `stopped` why it ended (completed, early_stopping,
    non_finite_loss). `health` is the network's verdict (training/health.py), `run_name` its MLflow run,
    `cost` the run's wall time and peak memory (the only fields that differ between identical reruns)."""

    dataset: str
    stage: str
    method: str
    phase: str
    setting: str
    teacher: str
    target: str
    seed: int
    epochs: int
    best_epoch: int
    test_accuracy: float | None
    test_accuracy_last: float | None
    best_val_loss: float | None
    best_val_accuracy: float | None
    extras: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)
    max_epochs: int = 0
    stopped: str = "completed"
    health: dict[str, Any] = field(default_factory=dict)
    run_name: str = ""
    cost: dict[str, float | None] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)   # segmentation: the authors' OA, AA, mIoU


@dataclass
class LoadedDataset:
    spec: DatasetSpec
    data: DeviceDataset
    splits: dict[int, dict[str, torch.Tensor]]
    model_options: dict[str, Any] = field(default_factory=dict)   # e.g. FuseNet's width (params `fusenet`)

    def to(self, device: torch.device) -> "LoadedDataset":
        """The same dataset and splits on `device` (a Ray worker's run device)."""
        device = torch.device(device)
        if device == self.data.device:
            return self
        return LoadedDataset(self.spec, self.data.to(device),
                             {seed: {k: v.to(device) for k, v in split.items()} for seed, split in self.splits.items()},
                             self.model_options)

    def input_shapes(self, inputs: tuple[str, ...]) -> list[tuple[int, ...]]:
        return [tuple(getattr(self.data, key).shape[1:]) for key in inputs]

    def role_network(self, role: str) -> Network:
        """A freshly initialised network for `role` ("mm", "m1" or "m2"), on the data's device."""
        inputs = network_inputs(role)
        return build_network(self.spec.networks[role], inputs, self.spec.num_classes,
                             self.input_shapes(inputs), self.model_options).to(self.data.device)


def network_inputs(role: str) -> tuple[str, ...]:
    return ("m1", "m2") if role == "mm" else (role,)


def write_records(path: Path, records: list[RunRecord]) -> None:
    write_json(path, {"runs": [dataclasses.asdict(r) for r in records]})


def check_applicable(method: str, spec: DatasetSpec) -> None:
    """ParamsError unless `method` runs on `spec`'s task (segmentation: the paper's Table 2 methods)."""
    cls = method_class(method)
    if spec.task == "segmentation" and not cls.segmentation:
        raise ParamsError(f"{method} cannot run on {spec.key} (semantic segmentation): the paper's Table 2 has no "
                          f"{cls.display_name or method} row (baselines-spec Q7); list only Table 2 methods under "
                          "segmentation.methods")


def load_dataset(params: Params, key: str, prepared_dir: Path, device: torch.device) -> LoadedDataset:
    """The prepared dataset as tensors on `device`, each run seed's train/val/test positions, and the options
    of its architectures (FuseNet's width and initialisation)."""
    spec = dataset_spec(key)
    options = params.fusenet.options(key) if any(takes_options(a) for a in spec.networks.values()) else {}
    arrays = read_prepared(prepared_dir, spec.num_classes, spec.label_ndim)
    n = len(arrays["labels"])
    splits = {}
    for seed in params.seeds:
        column = read_split_column(prepared_dir / SPLIT_FILE, seed, n)
        splits[seed] = split_positions(column, params.splits.train_fraction, params.splits.val_fraction,
                                       groups=arrays.get("groups")).to(device)
    data = DeviceDataset.from_arrays(arrays, device, params.engine.data_residency, spec.ignore_label)
    return LoadedDataset(spec, data, splits, options)


def make_setup(loaded: LoadedDataset, params: Params, seed: int, *, method: str, target: str, teacher_config: str,
               student: Network | None, teacher: Network | None = None, phase: str | None = None,
               setting: str = "default", restored: dict[str, Any] | None = None,
               method_params: Any = None) -> MethodSetup:
    """The MethodSetup of one run, with the method's params block (resolved) unless given."""
    return MethodSetup(student=student, teacher=teacher, teacher_config=teacher_config, target=target,
                       dataset=loaded.spec.key, num_classes=loaded.spec.num_classes,
                       sample=loaded.data.batch(loaded.splits[seed]["train"][:4]),
                       build_network=loaded.role_network,
                       method_params=method_params if method_params is not None else params.method(method),
                       cache_frozen_outputs=params.engine.cache_frozen_outputs, phase=phase, setting=setting,
                       restored=restored or {})


@dataclass
class RunOutcome:
    records: list[RunRecord]
    method: DistillationMethod
    result: TrainResult


def run_method(params: Params, loaded: LoadedDataset, tracker: Tracker, *, stage: str, method: str, teacher: str,
               target: str | None, seed: int, config: TrainingParams, setup: Callable[[], MethodSetup],
               phase: str | None = None, setting: str = "default", save: dict[str, Path] | None = None,
               run_params: dict | None = None, name_suffix: str = "") -> RunOutcome:
    """Seed, build (`setup()` runs after seeding, so every network it builds draws from the run's seed), train
    and evaluate one method run, recorded as one tracked run. `target`: the student's batch key (None for a
    run that trains every network, MST-Distill's collaborative initialisation). `save`: checkpoint name (as
    the method's `checkpoints()`, or "student") → path. `name_suffix` tells apart runs of one stage that would
    otherwise share a name (the top-k sweep's k, a method variant's phase)."""
    spec = loaded.spec
    cls = method_class(method)
    target_name = spec.modality_name(target) if target else "all"
    label = method if setting in ("default", "teacher") else f"{method}-{setting}"
    name = f"{stage}/{label}/{teacher}/{target_name}/seed{seed}" + (f"/{name_suffix}" if name_suffix else "")
    context = RunContext(loaded.data, loaded.splits[seed], config.batch_size, config.epochs, config.lr,
                         spec.num_classes, torch.Generator().manual_seed(seed), selection=params.engine.selection,
                         # validation batches have the training batch size, as in the authors' loaders: the
                         # selection score is a mean of per-batch means (quirk Q9)
                         eval_batch_size=config.batch_size, patience=config.patience, min_epochs=config.min_epochs)
    seed_everything(seed, params.deterministic)
    torch.set_flush_denormal(params.engine.flush_denormal)
    run_setup = setup()
    built = cls.from_setup(run_setup)
    phase = phase or built.main_phase_name
    tags = {"run.dataset": spec.key, "run.stage": stage, "run.method": method, "run.setting": setting,
            "run.phase": phase, "run.teacher": teacher, "run.target": target_name,
            "run.seed": str(seed), "device": str(loaded.data.device)}
    method_block = cls.run_params(run_setup.method_params) if cls.params_type else {}
    all_params = {"dataset": spec.key, "stage": stage, "method": method, "setting": setting,
                  "phase": phase, "teacher": teacher, "target": target_name, "seed": seed,
                  "student_arch": built.student.arch,
                  **{f"train.{k}": v for k, v in dataclasses.asdict(config).items()},
                  **{f"engine.{k}": v for k, v in dataclasses.asdict(params.engine).items()},
                  "deterministic": params.deterministic, **method_block, **(run_params or {})}
    progress = EpochProgress(name, params.executor.progress_interval_s)

    def log(phase_name: str, epoch: int, metrics: dict[str, float]) -> None:
        run.log_metrics({f"{phase_name}/{k}": v for k, v in metrics.items()}, step=epoch)
        progress.epoch(phase_name, epoch, metrics)

    with tracker.run(name, all_params, tags) as run:
        started = time.perf_counter()
        with PeakMemory(loaded.data.device) as memory:
            result = train(built, context, log=log)
        cost = {"train_s": round(time.perf_counter() - started, 3), "peak_mb": memory.peak_mb,
                "device": str(loaded.data.device)}
        extras = built.run_extras(result)
        summary = {"best_epoch": result.final.best_epoch, "epochs_run": result.final.epochs,
                   "wall_time_s": cost["train_s"], **({"peak_memory_mb": memory.peak_mb} if memory.peak_mb else {})}
        for role, evaluation in result.test.items():
            suffix = "" if role == "student" else f"_{spec.modality_name(role)}"
            summary.update({f"test_accuracy{suffix}": evaluation.accuracy, f"test_loss{suffix}": evaluation.loss,
                            f"test_accuracy_last{suffix}": result.test_last[role].accuracy,
                            **{f"test_{k}{suffix}": v for k, v in evaluation.metrics.items()}})
        run.log_metrics(summary)
        with tempfile.TemporaryDirectory() as tmp:
            for path in _artifacts(result, extras, Path(tmp), f"{spec.display_name} {name}"):
                run.log_artifact(path)
        for key, path in (save or {}).items():
            module = built.student if key == "student" else built.checkpoints()[key]
            if isinstance(module, Network):
                save_checkpoint(path, module, module.state_dict(), loaded.input_shapes(module.inputs),
                                spec.num_classes)
            else:
                save_module_state(path, module)
    final = result.final
    common = dict(dataset=spec.key, stage=stage, method=method, phase=final.name, setting=setting, teacher=teacher,
                  seed=seed, epochs=final.epochs, best_epoch=final.best_epoch, extras=extras,
                  max_epochs=final.max_epochs, stopped=final.stopped, run_name=name, cost=cost)
    curve = [{k: v for k, v in epoch.items() if k in ("epoch", "train_loss", "val_loss", "val_accuracy")}
             for epoch in final.history]
    non_finite = any(p.stopped == STOP_NON_FINITE for p in result.phases)
    n_val = len(loaded.splits[seed]["val"])

    def health(role: str | None, confusion: np.ndarray | None) -> dict[str, Any]:
        key = "val_accuracy" if role in (None, "student") else f"val_{role}_accuracy"
        accuracies = [epoch[key] for epoch in final.history if key in epoch] or None
        return assess(accuracies, confusion, non_finite, spec.num_classes, n_val).as_dict()

    if not result.test:  # nothing evaluated on test (e.g. MST-Distill's MaskNets)
        records = [RunRecord(target=target_name, test_accuracy=None, test_accuracy_last=None, best_val_loss=None,
                             best_val_accuracy=None, curve=curve, health=health(None, None), **common)]
    else:
        records = []
        for role, evaluation in result.test.items():
            records.append(RunRecord(
                target=spec.modality_name(target if role == "student" else role), test_accuracy=evaluation.accuracy,
                test_accuracy_last=result.test_last[role].accuracy,
                best_val_loss=final.best_metrics.get("val_loss", final.best_metrics.get(f"val_{role}_loss")),
                best_val_accuracy=final.best_metrics.get("val_accuracy",
                                                         final.best_metrics.get(f"val_{role}_accuracy")),
                curve=curve if role == "student" else [], health=health(role, evaluation.confusion),
                test_metrics=dict(evaluation.metrics), **common))
    return RunOutcome(records, built, result)


def _artifacts(result: TrainResult, extras: dict, folder: Path, title: str) -> list[Path]:
    """Confusion matrices of the evaluated networks, each phase's history as CSV, the routing curves."""
    paths = []
    for role, evaluation in result.test.items():
        suffix = "" if role == "student" else f"_{role}"
        paths.append(confusion_matrix_png(evaluation.confusion, folder / f"confusion_matrix{suffix}.png",
                                          f"{title}: test acc {evaluation.accuracy:.3f}"))
    for phase in result.phases:
        if not phase.history:
            continue
        path = folder / ("history.csv" if phase is result.final else f"history_{phase.name}.csv")
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(phase.history[0]))
            writer.writeheader()
            writer.writerows(phase.history)
        paths.append(path)
    if extras.get("routing"):
        paths.append(routing_curves_png(np.array(extras["routing"]), extras["specialists"], folder / "routing.png",
                                        f"{title}: routing (top-{extras['topk']})"))
    return paths
