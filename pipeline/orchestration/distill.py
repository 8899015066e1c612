"""The distill stage: one baseline, every teacher configuration its params list, both targets and every seed.
Teachers come from the teachers stage; every checkpoint is checked before any run trains."""

from __future__ import annotations

from pathlib import Path

from pipeline.methods import check_teacher_config, method_class
from pipeline.orchestration.config import Params
from pipeline.orchestration.executors import Job
from pipeline.orchestration.jobs import check_networks, load_network, run_jobs
from pipeline.orchestration.runs import LoadedDataset, RunRecord, make_setup, run_method
from pipeline.tracking.base import Tracker


def distill(params: Params, method_name: str, loaded: LoadedDataset, teachers_dir: Path,
            tracker: Tracker) -> list[RunRecord]:
    """Train a student of each target modality with `method_name`, once per teacher configuration listed in
    the method's params (`mm`: the multimodal teacher, `cm`: the other modality's teacher, `mm+cm`: methods
    that build their own peers), for every seed. Teachers come from the teachers stage."""
    cls = method_class(method_name)
    method_params = params.method(method_name)
    configs = getattr(method_params, "teachers", cls.teacher_configs)
    for config in configs:
        check_teacher_config(cls, config)
    spec = loaded.spec
    # the MM teacher, or each target's CM teacher (both unimodal networks); mm+cm methods build their own
    needed = {role for config in configs for role in {"mm": ("mm",), "cm": ("m1", "m2")}.get(config, ())}
    check_networks(loaded, params, teachers_dir, sorted(needed))

    def job(seed: int, target: str, config: str):
        def run(tracker: Tracker) -> RunRecord:
            role = {"mm": "mm", "cm": spec.other(target)}.get(config)
            teacher = load_network(loaded, teachers_dir, seed, role) if role else None
            outcome = run_method(params, loaded, tracker, stage="distill", method=method_name, teacher=config,
                                 target=target, seed=seed, config=params.training[spec.key],
                                 run_params={"teacher_arch": teacher.arch} if teacher is not None else {},
                                 setup=lambda: make_setup(loaded, params, seed, method=method_name, target=target,
                                                          teacher_config=config, teacher=teacher,
                                                          student=loaded.role_network(target),
                                                          method_params=method_params))
            return outcome.records[0]
        return Job(f"distill/{method_name}/{config}/{spec.modality_name(target)}/seed{seed}", run)

    jobs = [job(seed, target, config) for seed in params.seeds for target in ("m1", "m2") for config in configs]
    return run_jobs(params, loaded, jobs, tracker)


