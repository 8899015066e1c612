"""The stages of MST-Distill: its three phases (mst_s1, mst_s2, mst_s3), the stage ablation of paper Table 3
(mst_ablation), the top-k sweep of paper Fig. 6 (mst_topk_sweep) and the method variants of paper Tables 7
and 8 and Fig. 5 (mst_variants). Each checks every checkpoint it will load before any training, then runs
its independent runs side by side through `runs.run_method`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.io import check_writable
from pipeline.methods.mst.method import MSTDistill
from pipeline.methods.mst.settings import ABLATION_SETTINGS, MST_VARIANTS, STAGE_SETTINGS
from pipeline.methods.mst.specialist_adaptation import SpecialistMasks
from pipeline.models.registry import Network
from pipeline.orchestration.config import Params
from pipeline.orchestration.executors import Job
from pipeline.orchestration.jobs import check_masks, check_networks, load_network, masks_path, network_path, run_jobs
from pipeline.orchestration.runs import ROLES, LoadedDataset, RunRecord, make_setup, run_method
from pipeline.params import BlockError, fail
from pipeline.tracking.base import Tracker
from pipeline.training.checkpoints import load_module_state


def _mst_params(params: Params):
    return params.method("mst")


def mst_collaborative_init(params: Params, loaded: LoadedDataset, models_dir: Path, tracker: Tracker, *,
                           stage: str = "mst_s1", setting: str = "default") -> list[RunRecord]:
    """Phase 1 per seed (shared by both targets); saves models_dir/seed<s>/{mm,m1,m2}.pt."""
    mst = _mst_params(params)
    check_writable(models_dir)

    def job(seed: int):
        def run(tracker: Tracker) -> list[RunRecord]:
            # every network is trained here, whatever the teacher set of the later phases
            return run_method(params, loaded, tracker, stage=stage, method="mst", teacher="mm+cm",
                              target=None, seed=seed, config=params.teacher_training[loaded.spec.key],
                              phase="collaborative_init", setting=setting,
                              save={role: network_path(models_dir, seed, role) for role in ROLES},
                              setup=lambda: make_setup(loaded, params, seed, method="mst", target="m1",
                                                       teacher_config="mm+cm", student=None,
                                                       phase="collaborative_init", method_params=mst)).records
        return Job(f"{stage}/{setting}/collaborative_init/seed{seed}", run,
                   tuple(network_path(models_dir, seed, role) for role in ROLES))

    return [r for records in run_jobs(params, loaded, [job(seed) for seed in params.seeds], tracker) for r in records]


def _networks(loaded: LoadedDataset, folder: Path, seed: int) -> dict[str, Network]:
    return {role: load_network(loaded, folder, seed, role) for role in ROLES}


def _specialist_run(params: Params, loaded: LoadedDataset, tracker: Tracker, *, stage: str, networks_dir: Path,
                    seed: int, target: str, setting: str = "default", save: Path | None = None):
    mst = _mst_params(params)
    return run_method(params, loaded, tracker, stage=stage, method="mst", teacher=mst.teacher_set, target=target,
                      seed=seed, config=params.teacher_training[loaded.spec.key], phase="specialist_adaptation",
                      setting=setting, save={"masks": save} if save else None,
                      # a variant's phase-2 and phase-3 runs share the setting: the phase tells them apart
                      name_suffix="specialist_adaptation" if stage == "mst_variants" else "",
                      setup=lambda: make_setup(loaded, params, seed, method="mst", target=target,
                                               teacher_config="mm+cm", student=None, phase="specialist_adaptation",
                                               restored={"networks": _networks(loaded, networks_dir, seed)},
                                               method_params=mst))


def mst_specialist_adaptation(params: Params, loaded: LoadedDataset, stage1_dir: Path, masks_dir: Path,
                              tracker: Tracker, *, stage: str = "mst_s2", setting: str = "default") -> list[RunRecord]:
    """Phase 2 per seed and target on the phase-1 networks (mst_s1); saves masks_dir/seed<s>/<target>.pt."""
    check_networks(loaded, params, stage1_dir)
    check_writable(masks_dir)

    def job(seed: int, target: str):
        def run(tracker: Tracker) -> RunRecord:
            return _specialist_run(params, loaded, tracker, stage=stage, networks_dir=stage1_dir, seed=seed,
                                   target=target, setting=setting,
                                   save=masks_path(masks_dir, seed, target)).records[0]
        return Job(f"{stage}/{setting}/specialist_adaptation/{loaded.spec.modality_name(target)}/seed{seed}", run,
                   (masks_path(masks_dir, seed, target),))

    return run_jobs(params, loaded, [job(seed, target) for seed in params.seeds for target in ("m1", "m2")], tracker)


def _restored_masks(params: Params, loaded: LoadedDataset, networks: dict[str, Network], path: Path, target: str,
                    seed: int) -> SpecialistMasks:
    mst = _mst_params(params)
    with torch.random.fork_rng(devices=[]):  # sizing only: the weights come from the file
        groups = MSTDistill.teacher_groups(mst, networks, target, loaded.data.batch(loaded.splits[seed]["train"][:2]),
                                           loaded.spec.key)
    return load_module_state(path, SpecialistMasks(groups))


def _distillation_run(params: Params, loaded: LoadedDataset, tracker: Tracker, *, stage: str, seed: int,
                      target: str, setting: str, networks_dir: Path, masks: SpecialistMasks | Path | None,
                      topk: int) -> RunRecord:
    """One phase-3 run of `setting` (Table 3): S1 on — teachers and student from phase 1 (mst_s1); off —
    teachers from the teachers stage and a fresh student. S2 on — the teachers masked by `masks`; S3 on — GateNet top-k."""
    try:
        mst = _mst_params(params).with_topk(topk)
    except BlockError as err:
        raise fail("params.yaml", "topk", err.message) from None
    s1 = STAGE_SETTINGS[setting].s1 if setting in STAGE_SETTINGS else True  # a method variant: the full method

    def setup():
        networks = _networks(loaded, networks_dir, seed)
        restored = {"networks": networks}
        if masks is not None:
            restored["masks"] = (masks if isinstance(masks, SpecialistMasks)
                                 else _restored_masks(params, loaded, networks, masks, target, seed))
        student = None if s1 else loaded.role_network(target)
        return make_setup(loaded, params, seed, method="mst", target=target, teacher_config="mm+cm", student=student,
                          phase="dynamic_distillation", setting=setting if setting in STAGE_SETTINGS else "full",
                          restored=restored, method_params=mst)

    return run_method(params, loaded, tracker, stage=stage, method="mst", teacher=mst.teacher_set, target=target,
                      seed=seed, config=params.training[loaded.spec.key], phase="dynamic_distillation",
                      setting=setting, setup=setup,
                      name_suffix=f"top{topk}" if stage == "mst_topk_sweep" else "").records[0]


def mst_dynamic_distillation(params: Params, loaded: LoadedDataset, stage1_dir: Path, masks_dir: Path,
                             tracker: Tracker, topks: list[int] | None = None,
                             stage: str = "mst_s3", setting: str = "full") -> list[RunRecord]:
    """Phase 3 per seed and target (the MST-Distill rows of Table 1), once per k in `topks` (default: the
    top-level `topk`); each record carries the per-epoch routing fractions for paper Fig. 4."""
    check_networks(loaded, params, stage1_dir)
    check_masks(params, masks_dir)
    topks = topks or [params.topk]

    def job(seed: int, target: str, k: int):
        def run(tracker: Tracker) -> RunRecord:
            return _distillation_run(params, loaded, tracker, stage=stage, seed=seed, target=target, setting=setting,
                                     networks_dir=stage1_dir, masks=masks_path(masks_dir, seed, target), topk=k)
        return Job(f"{stage}/{setting}/dynamic_distillation/top{k}/{loaded.spec.modality_name(target)}/seed{seed}",
                   run)

    jobs = [job(seed, target, k) for k in topks for seed in params.seeds for target in ("m1", "m2")]
    return run_jobs(params, loaded, jobs, tracker)


def mst_ablation(params: Params, loaded: LoadedDataset, teachers_dir: Path, stage1_dir: Path, masks_dir: Path,
                 tracker: Tracker) -> list[RunRecord]:
    """Every setting of Table 3 but the full method, per seed and target. The MaskNets of the settings with S2
    but without S1 are fitted once per seed and target (phase 2 on the independently trained networks, whose
    w/o-KD network is the student) and shared by those settings."""
    check_networks(loaded, params, teachers_dir)
    check_networks(loaded, params, stage1_dir)
    check_masks(params, masks_dir)

    def job(seed: int, target: str):
        def run(tracker: Tracker) -> list[RunRecord]:
            independent = None
            records = []
            for setting in ABLATION_SETTINGS:
                s1, s2, _ = STAGE_SETTINGS[setting][1:]
                masks = None
                if s2 and s1:
                    masks = masks_path(masks_dir, seed, target)
                elif s2:
                    if independent is None:
                        independent = _specialist_run(params, loaded, tracker, stage="mst_ablation",
                                                      networks_dir=teachers_dir, seed=seed, target=target,
                                                      setting="independent").method.masks
                    masks = independent
                records.append(_distillation_run(params, loaded, tracker, stage="mst_ablation", seed=seed,
                                                 target=target, setting=setting, masks=masks, topk=params.topk,
                                                 networks_dir=stage1_dir if s1 else teachers_dir))
            return records
        return Job(f"mst_ablation/{loaded.spec.modality_name(target)}/seed{seed}", run)

    jobs = [job(seed, target) for seed in params.seeds for target in ("m2", "m1")]
    records = [r for group in run_jobs(params, loaded, jobs, tracker) for r in group]
    names = [loaded.spec.modality_name(t) for t in ("m1", "m2")]
    return sorted(records, key=lambda r: (r.seed, names.index(r.target), ABLATION_SETTINGS.index(r.setting)))


def topk_sweep(params: Params, loaded: LoadedDataset, stage1_dir: Path, masks_dir: Path,
               tracker: Tracker) -> list[RunRecord]:
    """Paper Fig. 6: phase 3 for every k = 1..N on the same phase-1 networks and phase-2 MaskNets."""
    n = _mst_params(params).n_specialists
    return mst_dynamic_distillation(params, loaded, stage1_dir, masks_dir, tracker, topks=list(range(1, n + 1)),
                                    stage="mst_topk_sweep")


def with_mst_overrides(params: Params, overrides: dict) -> Params:
    """`params` with fields of the `mst` block replaced (a method variant)."""
    return dataclasses.replace(params, blocks={**params.blocks,
                                               "mst": dataclasses.replace(params.blocks["mst"], **overrides)})


def mst_variants(params: Params, loaded: LoadedDataset, stage1_dir: Path, masks_dir: Path, models_dir: Path,
                 tracker: Tracker) -> list[RunRecord]:
    """Every method variant of `MST_VARIANTS` (paper Tables 7, 8 and Fig. 5), per seed and target: the phases
    from the first one the variant changes, on the default pipeline's earlier phases (mst_s1 networks, mst_s2
    MaskNets); a variant's own networks and MaskNets go to models_dir/<variant>/."""
    check_networks(loaded, params, stage1_dir)
    check_masks(params, masks_dir)
    check_writable(models_dir)
    for name, variant in MST_VARIANTS.items():  # every variant's params are valid before any training
        try:
            with_mst_overrides(params, variant.overrides).method("mst").with_topk(params.topk)
        except BlockError as err:
            raise fail("params.yaml", f"mst (variant {name})", err.message) from None
    records: list[RunRecord] = []
    for name, variant in MST_VARIANTS.items():
        varied = with_mst_overrides(params, variant.overrides)
        networks, masks = stage1_dir, masks_dir
        if variant.first_phase == "collaborative_init":
            networks = models_dir / name / "stage1"
            records += mst_collaborative_init(varied, loaded, networks, tracker, stage="mst_variants", setting=name)
        if variant.first_phase in ("collaborative_init", "specialist_adaptation"):
            masks = models_dir / name / "stage2"
            records += mst_specialist_adaptation(varied, loaded, networks, masks, tracker, stage="mst_variants",
                                                 setting=name)
        records += mst_dynamic_distillation(varied, loaded, networks, masks, tracker, stage="mst_variants",
                                            setting=name)
    return records
