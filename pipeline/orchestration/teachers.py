"""The teachers stage: per seed, the multimodal and both unimodal networks trained alone with CE (the MM and CM
teachers, and the w/o KD rows)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.io import check_writable
from pipeline.methods.ce import CrossEntropyOnly
from pipeline.orchestration.config import Params
from pipeline.orchestration.executors import Job
from pipeline.orchestration.jobs import network_path, run_jobs
from pipeline.orchestration.runs import ROLES, LoadedDataset, RunRecord, make_setup, run_method
from pipeline.tracking.base import Tracker

CE = CrossEntropyOnly.name


def train_teachers(params: Params, loaded: LoadedDataset, models_dir: Path, tracker: Tracker) -> list[RunRecord]:
    """Per seed, train the multimodal network and both unimodal networks from scratch with CE, with the
    `teacher_training` settings: the MM and CM teachers (setting "teacher"). The "w/o KD" rows of Table 1
    (setting "wo_kd") are the unimodal networks trained with the students' `training` settings: the same
    runs when both blocks agree (as on AV-MNIST), else trained here too."""
    key = loaded.spec.key
    teacher_cfg, student_cfg = params.teacher_training[key], params.training[key]
    check_writable(models_dir)

    def job(seed: int, role: str, setting: str):
        def run(tracker: Tracker) -> list[RunRecord]:
            save = {"student": network_path(models_dir, seed, role)} if setting == "teacher" else None
            outcome = run_method(params, loaded, tracker, stage="teachers", method=CE, teacher="none", target=role,
                                 seed=seed, config=teacher_cfg if setting == "teacher" else student_cfg,
                                 setting=setting, save=save,
                                 setup=lambda: make_setup(loaded, params, seed, method=CE, target=role,
                                                          teacher_config="none", student=loaded.role_network(role)))
            (record,) = outcome.records
            if setting == "teacher" and role != "mm" and teacher_cfg == student_cfg:
                return [record, dataclasses.replace(record, setting="wo_kd")]
            return [record]
        return Job(f"teachers/{setting}/{loaded.spec.modality_name(role)}/seed{seed}", run,
                   (network_path(models_dir, seed, role),) if setting == "teacher" else ())

    # the slow multimodal runs first, so the worker processes finish together
    jobs = [job(seed, role, "teacher") for role in ("mm", "m2", "m1") for seed in params.seeds]
    if teacher_cfg != student_cfg:
        jobs += [job(seed, role, "wo_kd") for role in ("m2", "m1") for seed in params.seeds]
    records = [r for group in run_jobs(params, loaded, jobs, tracker) for r in group]
    order = {"teacher": 0, "wo_kd": 1}
    names = [loaded.spec.modality_name(role) for role in ROLES]
    return sorted(records, key=lambda r: (order[r.setting], r.seed, names.index(r.target)))
