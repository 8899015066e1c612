"""MST-Distill's three stages as pipeline steps (stage scripts call these; see pipeline/methods/mst/).

Stage 1 trains the multimodal and both unimodal networks jointly, once per seed (shared by both
targets). Stage 2, per seed and target, fits one MaskNet per hooked layer of each teacher. Stage 3, per
seed and target, trains the stage-1 student with the GateNet over the N specialised teachers; this is
the "MST-Distill (MM+CM)" row of Table 1. The stage ablation (paper Table 3) switches stages off.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pipeline.benchmark import LoadedDataset, build_role_network, network_inputs, run_jobs, run_training
from pipeline.data.catalog import DatasetSpec
from pipeline.methods.mst.averaged_distillation import AveragedDistillation
from pipeline.methods.mst.collaborative_init import collaborative_init
from pipeline.methods.mst.dynamic_distillation import DynamicDistillation, LossWeights
from pipeline.methods.mst.specialist_adaptation import TeacherGroup, build_group, masked_logits, specialist_adaptation
from pipeline.params import Params
from pipeline.reporting.figures import routing_curves_png
from pipeline.tracking.base import Tracker
from pipeline.training.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.training.engine import TrainResult, evaluate
from pipeline.training.runtime import seed_everything

ROLES = ("mm", "m1", "m2")


def _run_params(params: Params) -> dict:
    return {"fidelity": params.fidelity, "topk": params.topk,
            **{f"mst.{k}": v for k, v in dataclasses.asdict(params.mst_effective()).items()}}


def _identity(spec: DatasetSpec, stage: str, target: str, seed: int, teacher_set: str) -> dict:
    """The params every run records: which dataset, stage, method, teachers, target and seed."""
    return {"dataset": spec.key, "stage": stage, "method": "mst", "teacher": teacher_set, "target": target,
            "seed": seed}


def _tags(spec: DatasetSpec, stage: str, target: str, seed: int, device) -> dict[str, str]:
    return {"run.dataset": spec.key, "run.stage": stage, "run.method": "mst", "run.teacher": "mm+cm",
            "run.target": target, "run.seed": str(seed), "device": str(device)}


def stage1(params: Params, loaded: LoadedDataset, models_dir: Path, tracker: Tracker) -> list[dict]:
    """Collaborative initialisation per seed; saves models_dir/seed<s>/{mm,m1,m2}.pt."""
    spec, mst, cfg = loaded.spec, params.mst_effective(), params.teacher_training[loaded.spec.key]

    def job(seed: int):
        def run(tracker: Tracker) -> list[dict]:
            seed_everything(seed, params.deterministic)
            nets = {role: build_role_network(loaded, role).to(loaded.data.device) for role in ROLES}
            split = loaded.splits[seed]
            with tracker.run(f"mst_s1/mst/mm+cm/all/seed{seed}",
                             {**_identity(spec, "mst_s1", "all", seed, mst.teacher_set), **_run_params(params),
                              **{f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()}},
                             _tags(spec, "mst_s1", "all", seed, loaded.data.device)) as run:
                collaborative_init(nets, loaded.data, split, epochs=mst.stage1_epochs[spec.key],
                                   batch_size=cfg.batch_size, lr=cfg.lr, temperature=mst.temperature,
                                   detach_peer=mst.stage1_detach, num_classes=spec.num_classes,
                                   generator=torch.Generator().manual_seed(seed),
                                   on_epoch=lambda e, m: run.log_metrics(m, step=e))
                accuracy = {role: evaluate(nets[role], loaded.data, split["test"], spec.num_classes,
                                           cfg.batch_size).accuracy for role in ROLES}
                run.log_metrics({f"test_accuracy_{role}": acc for role, acc in accuracy.items()})
            for role, net in nets.items():
                save_checkpoint(models_dir / f"seed{seed}" / f"{role}.pt", net, net.state_dict(),
                                loaded.input_shapes(net.inputs), spec.num_classes)
            return [{"dataset": spec.key, "stage": "mst_s1", "method": "mst_s1", "teacher": "none", "target": role,
                     "seed": seed, "test_accuracy": acc} for role, acc in accuracy.items()]
        return run

    return [r for records in run_jobs(params, loaded, [job(seed) for seed in params.seeds], tracker) for r in records]


def _stage1_network(loaded: LoadedDataset, networks_dir: Path, seed: int, role: str):
    """A saved network of `role` (stage-1 or teachers-stage checkpoints share one format)."""
    return load_checkpoint(networks_dir / f"seed{seed}" / f"{role}.pt", loaded.data.device,
                           expect_arch=loaded.spec.networks[role], expect_inputs=network_inputs(role))


def _teacher_groups(params: Params, loaded: LoadedDataset, networks_dir: Path, seed: int,
                    target: str) -> list[TeacherGroup]:
    """Frozen teachers for `target` (from stage 1, or from the teachers stage for the ablation) with fresh
    MaskNets at their hooked layers."""
    mst, spec = params.mst_effective(), loaded.spec
    roles = {"mm": "mm", "cm": spec.other(target)}
    sample = loaded.data.batch(loaded.splits[seed]["train"][:2])
    groups = []
    for config in mst.teacher_set.split("+"):
        role = roles[config]
        layers = mst.hooks[spec.key][role][:mst.mask_layer_num]
        groups.append(build_group(config, _stage1_network(loaded, networks_dir, seed, role), layers, sample,
                                  mst.hidden_factor[spec.key], mst.heads))
    return groups


def stage2(params: Params, loaded: LoadedDataset, stage1_dir: Path, masks_dir: Path, tracker: Tracker) -> list[dict]:
    """Specialised teacher adaptation per seed and target; saves masks_dir/seed<s>/<target>.pt."""
    spec, mst, cfg = loaded.spec, params.mst_effective(), params.teacher_training[loaded.spec.key]

    def job(seed: int, target: str):
        def run(tracker: Tracker) -> dict:
            seed_everything(seed, params.deterministic)
            student = _stage1_network(loaded, stage1_dir, seed, target)
            groups = _teacher_groups(params, loaded, stage1_dir, seed, target)
            name = f"mst_s2/mst/mm+cm/{spec.modality_name(target)}/seed{seed}"
            with tracker.run(name, {**_identity(spec, "mst_s2", spec.modality_name(target), seed, mst.teacher_set),
                                    **_run_params(params)},
                             _tags(spec, "mst_s2", spec.modality_name(target), seed, loaded.data.device)) as run:
                metrics = specialist_adaptation(student, groups, loaded.data, loaded.splits[seed],
                                                epochs=mst.stage2_epochs[spec.key], batch_size=cfg.batch_size,
                                                lr=mst.stage2_lr, temperature=mst.temperature,
                                                generator=torch.Generator().manual_seed(seed),
                                                on_epoch=lambda e, m: run.log_metrics(m, step=e))
            path = masks_dir / f"seed{seed}" / f"{target}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({g.name: {"layers": g.layers, "state_dict": g.masks.state_dict()} for g in groups}, path)
            return {"dataset": spec.key, "stage": "mst_s2", "method": "mst_s2", "teacher": mst.teacher_set,
                    "target": target, "seed": seed, "best_val_score": metrics["val_score"]}
        return run

    return run_jobs(params, loaded, [job(seed, target) for seed in params.seeds for target in ("m1", "m2")], tracker)


def _load_masks(groups: list[TeacherGroup], path: Path) -> None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for group in groups:
            if saved[group.name]["layers"] != group.layers:
                raise CheckpointError(f"{path}: MaskNets for layers {saved[group.name]['layers']}, expected "
                                      f"{group.layers} (re-run stage 2)")
            group.masks.load_state_dict(saved[group.name]["state_dict"])
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable stage-2 MaskNet file for teachers "
                              f"{[g.name for g in groups]}: {type(err).__name__}: {err}") from err
    for group in groups:
        group.masks.eval()


def way_labels(groups: list[TeacherGroup]) -> list[str]:
    """Names of the specialised teachers in routing order, e.g. "mm:fc1"."""
    return [f"{g.name}:{layer}" for g in groups for layer in g.layers]


def _routing(result: TrainResult, n_ways: int) -> list[list[float]]:
    return [[epoch[f"route_{i}"] for i in range(n_ways)] for epoch in result.history]


def _ways(groups: list[TeacherGroup], stacked_hooks: bool) -> list:
    # (Q2) with stacked hooks, way j of a teacher keeps MaskNets 0..j attached; the paper: only MaskNet j
    return [lambda batch, g=g, j=j: masked_logits(g, batch, list(range(j + 1)) if stacked_hooks else [j])
            for g in groups for j in range(len(g.layers))]


def _dynamic(params: Params, student, ways: list, num_classes: int) -> DynamicDistillation:
    mst = params.mst_effective()
    return DynamicDistillation(student, ways, num_classes, topk=min(params.topk, len(ways)),
                               temperature=mst.temperature, lb_mode=mst.lb_mode, lb_divide_by_n=mst.lb_divide_by_n,
                               weights=LossWeights(mst.lambda_kd, mst.lambda_lb, mst.decay_after_epoch0),
                               cache=params.engine.cache_frozen_outputs)


def stage3(params: Params, loaded: LoadedDataset, stage1_dir: Path, masks_dir: Path, tracker: Tracker) -> list[dict]:
    """Dynamic distillation per seed and target: the MST-Distill rows of Table 1. Each record also carries
    the per-epoch routing fractions (`routing`, epochs × N, teachers named in `ways`) for paper Fig. 4."""
    mst = params.mst_effective()
    spec = loaded.spec

    def job(seed: int, target: str):
        def run(tracker: Tracker) -> dict:
            groups = _teacher_groups(params, loaded, stage1_dir, seed, target)
            _load_masks(groups, masks_dir / f"seed{seed}" / f"{target}.pt")
            ways, labels = _ways(groups, mst.stacked_hooks), way_labels(groups)

            def figures(result: TrainResult, folder: Path) -> list[Path]:
                title = f"{spec.display_name} {spec.modality_name(target)} seed {seed}: routing (top-{params.topk})"
                return [routing_curves_png(np.array(_routing(result, len(ways))), labels, folder / "routing.png", title)]

            # the student continues from its stage-1 weights (quirk Q20 is also the paper's design)
            record, result, _ = run_training(
                params, loaded, tracker, stage="mst_s3", method_name="mst", teacher=mst.teacher_set, target=target,
                seed=seed, make_method=lambda: _dynamic(params, _stage1_network(loaded, stage1_dir, seed, target),
                                                        ways, spec.num_classes),
                run_params=_run_params(params), figures=figures)
            return {**dataclasses.asdict(record), "topk": params.topk, "ways": labels,
                    "routing": _routing(result, len(ways))}
        return run

    return run_jobs(params, loaded, [job(seed, target) for seed in params.seeds for target in ("m1", "m2")], tracker)


# Paper Table 3: which of the three stages are on. "No S1": teachers trained independently (the teachers
# stage) and a freshly initialised student; "no S2": the plain teachers, unmasked (N = number of teachers);
# "no S3": the teachers' distillation signals averaged (no GateNet). "full" is the mst_s3 stage itself.
ABLATION_SETTINGS: dict[str, tuple[bool, bool, bool]] = {
    "baseline": (False, False, False),
    "a": (True, False, False),
    "b": (False, True, False),
    "c": (False, False, True),
    "d": (True, True, False),
    "e": (True, False, True),
    "f": (False, True, True),
}


def stage_ablation(params: Params, loaded: LoadedDataset, teachers_dir: Path, stage1_dir: Path, masks_dir: Path,
                   tracker: Tracker) -> list[dict]:
    """Every setting of ABLATION_SETTINGS per seed and target (Table 3; the full method is stage 3). Students
    train with the `training` settings; the MaskNets of the settings with S2 but without S1 are fitted once
    per seed and target (stage 2 on the independently trained teachers) and shared by those settings."""
    mst, spec, cfg = params.mst_effective(), loaded.spec, params.teacher_training[loaded.spec.key]

    def independent_masks(seed: int, target: str, tracker: Tracker) -> list[TeacherGroup]:
        """Stage 2 against independently trained networks: the target's w/o-KD network is the student."""
        seed_everything(seed, params.deterministic)
        groups = _teacher_groups(params, loaded, teachers_dir, seed, target)
        name = f"mst_ablation/stage2/{spec.modality_name(target)}/seed{seed}"
        with tracker.run(name, {**_identity(spec, "mst_ablation", spec.modality_name(target), seed, mst.teacher_set),
                                **_run_params(params), "setting": "stage2_without_s1"},
                         _tags(spec, "mst_ablation", spec.modality_name(target), seed, loaded.data.device)) as run:
            specialist_adaptation(_stage1_network(loaded, teachers_dir, seed, target), groups, loaded.data,
                                  loaded.splits[seed], epochs=mst.stage2_epochs[spec.key], batch_size=cfg.batch_size,
                                  lr=mst.stage2_lr, temperature=mst.temperature,
                                  generator=torch.Generator().manual_seed(seed),
                                  on_epoch=lambda e, m: run.log_metrics(m, step=e))
        return groups

    def setting_run(seed: int, target: str, setting: str, shared: dict, tracker: Tracker) -> dict:
        s1, s2, s3 = ABLATION_SETTINGS[setting]
        if s2 and not s1:
            if "groups" not in shared:
                shared["groups"] = independent_masks(seed, target, tracker)
            groups = shared["groups"]
        else:
            groups = _teacher_groups(params, loaded, stage1_dir if s1 else teachers_dir, seed, target)
            if s2:
                _load_masks(groups, masks_dir / f"seed{seed}" / f"{target}.pt")
        ways = _ways(groups, mst.stacked_hooks) if s2 else [g.network for g in groups]

        def make_method():
            student = _stage1_network(loaded, stage1_dir, seed, target) if s1 else build_role_network(loaded, target)
            if s3:
                return _dynamic(params, student, ways, spec.num_classes)
            return AveragedDistillation(student, ways, temperature=mst.temperature,
                                        weights=LossWeights(mst.lambda_kd, mst.lambda_lb, mst.decay_after_epoch0),
                                        cache=params.engine.cache_frozen_outputs)

        record, _, _ = run_training(params, loaded, tracker, stage="mst_ablation", method_name=f"mst_{setting}",
                                    teacher=mst.teacher_set, target=target, seed=seed, make_method=make_method,
                                    run_params={**_run_params(params), "setting": setting, "S1": s1, "S2": s2,
                                                "S3": s3})
        return {**dataclasses.asdict(record), "setting": setting, "S1": s1, "S2": s2, "S3": s3}

    def job(seed: int, target: str):
        def run(tracker: Tracker) -> list[dict]:
            shared: dict = {}
            return [setting_run(seed, target, setting, shared, tracker) for setting in ABLATION_SETTINGS]
        return run

    jobs = [job(seed, target) for seed in params.seeds for target in ("m2", "m1")]
    records = [r for group in run_jobs(params, loaded, jobs, tracker) for r in group]
    return sorted(records, key=lambda r: (r["seed"], r["target"], list(ABLATION_SETTINGS).index(r["setting"])))
