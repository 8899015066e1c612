"""What each pipeline stage does, as plain functions of (params, paths, tracker).

Stage scripts in `stages/` only parse arguments and call these. A *run* is one trained network:
(stage, method, teacher config, target, seed); each becomes one MLflow child run and one record in
the stage's results file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import parallel
from pipeline.data.catalog import DatasetSpec, dataset_spec
from pipeline.data.splits import make_permutations, read_split_column, split_positions, write_split_file
from pipeline.data.tensors import DeviceDataset
from pipeline.methods.base import DistillationMethod, MethodSetup, check_teacher_config, method_class
from pipeline.models.registry import Network, build_network
from pipeline.params import Params, TrainingParams
from pipeline.reporting.figures import confusion_matrix_png
from pipeline.tracking.base import Tracker
from pipeline.training.checkpoints import load_checkpoint, save_checkpoint
from pipeline.training.engine import EngineConfig, TrainResult, train
from pipeline.training.runtime import resolve_device, seed_everything

SPLIT_FILE = "split_indices.csv"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class RunRecord:
    """One trained network's outcome, as stored in results/<dataset>/<stage>.json."""

    dataset: str
    stage: str
    method: str
    teacher: str          # "mm", "cm" or "none"
    target: str           # "m1", "m2" or "mm" (the multimodal network itself)
    seed: int
    test_accuracy: float  # best-validation checkpoint (the reported number)
    test_accuracy_last: float
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    epochs: int


@dataclass
class LoadedDataset:
    spec: DatasetSpec
    data: DeviceDataset
    splits: dict[int, dict[str, torch.Tensor]]

    def input_shapes(self, inputs: tuple[str, ...]) -> list[tuple[int, ...]]:
        return [tuple(getattr(self.data, key).shape[1:]) for key in inputs]


def write_json(path: Path, payload) -> None:
    """Write JSON atomically, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def prepare_dataset(params: Params, key: str, raw_dir: Path, out_dir: Path) -> dict:
    """Load and validate a dataset's raw files and write its split file (the authors' 20 permutations)
    and a summary (sizes, shapes, class counts) under `out_dir`."""
    spec = dataset_spec(key)
    arrays = spec.load(raw_dir, params)
    n = len(arrays["labels"])
    split = params.splits
    write_split_file(out_dir / SPLIT_FILE, make_permutations(n, split.permutations, split.seed))
    summary = {"dataset": key, "n_samples": n, "num_classes": spec.num_classes,
               "class_counts": np.bincount(arrays["labels"], minlength=spec.num_classes).tolist(),
               "shapes": {spec.modalities[m]: list(arrays[m].shape[1:]) for m in ("m1", "m2")}}
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def load_dataset(params: Params, key: str, raw_dir: Path, prepared_dir: Path, device: torch.device) -> LoadedDataset:
    """The whole dataset as tensors on `device`, and each run seed's train/val/test positions."""
    spec = dataset_spec(key)
    arrays = spec.load(raw_dir, params)
    n = len(arrays["labels"])
    splits = {}
    for seed in params.seeds:
        column = read_split_column(prepared_dir / SPLIT_FILE, seed, n)
        splits[seed] = split_positions(column, params.splits.train_fraction, params.splits.val_fraction).to(device)
    return LoadedDataset(spec, DeviceDataset.from_arrays(arrays, device), splits)


def network_inputs(role: str) -> tuple[str, ...]:
    return ("m1", "m2") if role == "mm" else (role,)


def build_role_network(loaded: LoadedDataset, role: str) -> Network:
    """A freshly initialised network for `role` ("mm", "m1" or "m2") of the dataset."""
    inputs = network_inputs(role)
    return build_network(loaded.spec.networks[role], inputs, loaded.spec.num_classes, loaded.input_shapes(inputs))


def run_training(params: Params, loaded: LoadedDataset, tracker: Tracker, *, stage: str, method_name: str,
                 teacher: str, target: str, seed: int, make_method: Callable[[], DistillationMethod],
                 run_params: dict, figures: Callable[[TrainResult, Path], list[Path]] | None = None,
                 config: TrainingParams | None = None) -> tuple[RunRecord, TrainResult, DistillationMethod]:
    """Seed, build (via `make_method`), train and evaluate one network, recording it as one tracked run.
    `config`: optimisation settings (default: the dataset's student `training` block).
    `figures(result, folder)` may add PNGs (written under `folder`) to the run's artifacts."""
    spec = loaded.spec
    cfg = config or params.training[spec.key]
    # validation batches have the training batch size, as in the authors' loaders: the selection score is
    # a mean of per-batch means (the last, partial batch weighs as much as a full one; quirk Q9)
    engine = EngineConfig(cfg.epochs, cfg.batch_size, cfg.lr, selection=params.engine.selection,
                          eval_batch_size=cfg.batch_size)
    seed_everything(seed, params.deterministic)
    method = make_method()
    target_name = spec.modality_name(target)
    name = f"{stage}/{method_name}/{teacher}/{target_name}/seed{seed}"
    tags = {"run.dataset": spec.key, "run.stage": stage, "run.method": method_name, "run.teacher": teacher,
            "run.target": target_name, "run.seed": str(seed), "device": str(loaded.data.device)}
    all_params = {"dataset": spec.key, "stage": stage, "method": method_name, "teacher": teacher,
                  "target": target_name, "seed": seed, "student_arch": method.student.arch,
                  **{f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()},
                  **{f"engine.{k}": v for k, v in dataclasses.asdict(params.engine).items()},
                  "deterministic": params.deterministic, **run_params}
    with tracker.run(name, all_params, tags) as run:
        started = time.perf_counter()
        result = train(method, loaded.data, loaded.splits[seed], engine, spec.num_classes,
                       torch.Generator().manual_seed(seed), on_epoch=lambda e, m: run.log_metrics(m, step=e),
                       on_prepare=lambda e, m: run.log_metrics(m, step=e))
        run.log_metrics({"test_accuracy": result.test.accuracy, "test_loss": result.test.loss,
                         "test_accuracy_last": result.test_last.accuracy, "best_epoch": result.best_epoch,
                         "wall_time_s": time.perf_counter() - started})
        with tempfile.TemporaryDirectory() as tmp:
            run.log_artifact(confusion_matrix_png(result.test.confusion, Path(tmp) / "confusion_matrix.png",
                                                  f"{spec.display_name} {name}: test acc {result.test.accuracy:.3f}"))
            history = Path(tmp) / "history.csv"
            with history.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(result.history[0]))
                writer.writeheader()
                writer.writerows(result.history)
            run.log_artifact(history)
            for path in figures(result, Path(tmp)) if figures else []:
                run.log_artifact(path)
    record = RunRecord(dataset=spec.key, stage=stage, method=method_name, teacher=teacher, target=target,
                       seed=seed, test_accuracy=result.test.accuracy, test_accuracy_last=result.test_last.accuracy,
                       best_epoch=result.best_epoch, best_val_loss=result.best_val.loss,
                       best_val_accuracy=result.best_val.accuracy, epochs=cfg.epochs)
    return record, result, method


def run_jobs(params: Params, loaded: LoadedDataset, jobs: list, tracker: Tracker) -> list:
    """A stage's independent runs, side by side in `params.workers` processes (pipeline/parallel.py)."""
    workers = parallel.resolve_workers(params.workers, loaded.data.device, len(jobs))
    return parallel.run_jobs(jobs, tracker, workers, params.threads_per_run)


def train_teachers(params: Params, loaded: LoadedDataset, models_dir: Path, tracker: Tracker) -> list[RunRecord]:
    """Per seed, train the multimodal network and both unimodal networks from scratch with CE, with the
    `teacher_training` settings: the MM and CM teachers. The "w/o KD" rows of Table 1 (stage `wo_kd`) are
    the unimodal networks trained with the students' `training` settings: the same runs when both blocks
    agree (as on AV-MNIST), else trained here too."""
    ce = method_class("ce")
    teacher_cfg, student_cfg = params.teacher_training[loaded.spec.key], params.training[loaded.spec.key]

    def job(seed: int, role: str, stage: str):
        def run(tracker: Tracker) -> list[RunRecord]:
            record, result, method = run_training(params, loaded, tracker, stage=stage, method_name="ce",
                                                  teacher="none", target=role, seed=seed,
                                                  make_method=lambda: ce(build_role_network(loaded, role)),
                                                  run_params={}, config=teacher_cfg if stage == "teachers" else
                                                  student_cfg)
            if stage == "wo_kd":
                return [record]
            save_checkpoint(models_dir / f"seed{seed}" / f"{role}.pt", method.student, result.best_state,
                            loaded.input_shapes(method.student.inputs), loaded.spec.num_classes)
            if role != "mm" and teacher_cfg == student_cfg:
                return [record, dataclasses.replace(record, stage="wo_kd")]
            return [record]
        return run

    # the slow multimodal runs first, so the worker processes finish together
    jobs = [job(seed, role, "teachers") for role in ("mm", "m2", "m1") for seed in params.seeds]
    if teacher_cfg != student_cfg:
        jobs += [job(seed, role, "wo_kd") for role in ("m2", "m1") for seed in params.seeds]
    records = [r for group in run_jobs(params, loaded, jobs, tracker) for r in group]
    order = {"teachers": 0, "wo_kd": 1}
    return sorted(records, key=lambda r: (order[r.stage], r.seed, ("mm", "m1", "m2").index(r.target)))


def load_teacher(loaded: LoadedDataset, teachers_dir: Path, seed: int, role: str) -> Network:
    return load_checkpoint(teachers_dir / f"seed{seed}" / f"{role}.pt", loaded.data.device,
                           expect_arch=loaded.spec.networks[role], expect_inputs=network_inputs(role))


def distill(params: Params, method_name: str, loaded: LoadedDataset, teachers_dir: Path,
            tracker: Tracker) -> list[RunRecord]:
    """Train a student of each target modality with `method_name`, once per teacher configuration listed
    in the method's params (`mm`: the multimodal teacher, `cm`: the other modality's teacher, `mm+cm`:
    methods that build their own peers), for every seed. Teachers come from the teachers stage."""
    cls = method_class(method_name)
    method_params = params.method(method_name)
    configs = getattr(method_params, "teachers", cls.teacher_configs)
    for config in configs:
        check_teacher_config(cls, config)
    spec = loaded.spec

    def job(seed: int, target: str, config: str):
        def run(tracker: Tracker) -> RunRecord:
            role = {"mm": "mm", "cm": spec.other(target)}.get(config)
            teacher = load_teacher(loaded, teachers_dir, seed, role) if role else None

            def make_method() -> DistillationMethod:
                return cls.from_setup(MethodSetup(
                    student=build_role_network(loaded, target), teacher=teacher, teacher_config=config,
                    target=target, dataset=spec.key, num_classes=spec.num_classes,
                    sample=loaded.data.batch(loaded.splits[seed]["train"][:4]),
                    build_network=lambda r: build_role_network(loaded, r).to(loaded.data.device),
                    method_params=method_params, cache_frozen_outputs=params.engine.cache_frozen_outputs))

            extra = {"teacher_arch": teacher.arch} if teacher is not None else {}
            record, _, _ = run_training(params, loaded, tracker, stage="distill", method_name=method_name,
                                        teacher=config, target=target, seed=seed, make_method=make_method,
                                        run_params={**cls.run_params(method_params), **extra})
            return record
        return run

    jobs = [job(seed, target, config) for seed in params.seeds for target in ("m1", "m2") for config in configs]
    return run_jobs(params, loaded, jobs, tracker)


def open_device(params: Params) -> torch.device:
    """The run device; also fixes torch's CPU thread count (`threads_per_run`), which every run of every
    stage uses whether it runs in the main process or in a worker, so results never depend on `workers`."""
    torch.set_num_threads(params.threads_per_run)
    return resolve_device(params.device)
