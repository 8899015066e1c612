"""The cost of the paper's whole experimental grid (Tables 1-3, 6-8, Figs. 5-6 on its five datasets), from
per-epoch times measured at the real datasets' shapes: on one device, and on N GPUs with Ray.

    python -m benchmarks.grid_cost [--epoch-times benchmarks/results/epoch_times_cpu.json]
        [--method-cost benchmarks/results/method_cost_cpu.json] [--seeds 5] [--gpus 1 2 4 8]
        [--runs-per-gpu 1] [--packing-speedup 1.0] [--studies DATASET ...] [--detail] [--json OUT]
    python -m benchmarks.method_cost --epochs 1 --samples 1000 > LOG
    python -m benchmarks.grid_cost --import-method-cost LOG --json benchmarks/results/method_cost_cpu.json

The grid is derived from params.yaml and the orchestration code, per dataset and seed: the teachers stage (MM
and both unimodal networks, CE; the w/o KD rows are the same runs when `teacher_training` equals `training`,
else two more), every baseline of `methods` (segmentation: of `segmentation.methods`) × its teacher configs ×
both targets, MST-Distill's phases (s1: one run of the three networks; s2 and s3: one per target), and on the
study datasets (default: every classification dataset, as in the paper) the Table 3 ablation (every setting but
the full method per target, plus one phase-2 run per target shared by the settings with S2 but no S1), the
top-k sweep (k = 1..N per target) and the method variants (each re-runs the phases from its first changed one).

Run time = epochs × epoch time, per phase. Epochs are the params' budgets (early stopping only shortens runs:
an upper bound). Epoch times, by preference: `measured` (benchmarks/dataset_epoch_time.py's JSON for the
dataset, network and method); for a method that JSON did not measure, or a (dataset, method) it lists as
skipped, its epoch time relative to KD on AV-Digits (benchmarks/method_cost.py's table, same target and teacher
config) times KD's measured epoch (`ratio×KD`; `ratio×CE` against the plain epoch when KD was not measured
there either), else KD's epoch itself (`KD's epoch`). Runs that train several networks at once are the sum of
those networks' measured CE epochs: MST-Distill phase 1 and methods that build their own peers (`mm+cm`, DML);
phase 2 trains MaskNets through frozen teachers, costed as the teachers' CE epochs. Every Table 3 setting, top-k
and variant phase 3 is costed as the default phase 3. One-off phases before a baseline's main phase (FitNets'
hint phase, MGDFR's co-training and salience; params `<x>_epochs` per dataset) scale method_cost's one-off time
per AV-Digits epoch by KD's epoch. Teacher caching and MaskNet construction are not counted.

Ray: the makespan of a longest-processing-time-first list schedule of the schedulable jobs (a stage's
`run_jobs` units: one per run, except a Table 3 job, which trains its settings one after another) over N
devices, a job starting only when every stage it reads from has finished on its dataset (teachers before the
baselines and the ablation; s1 before s2 before s3; a variant's own phases in order; stage by stage, as
`dvc repro` hands them over, not seed by seed). `--runs-per-gpu K` puts
K jobs on a device at once, each running K / `--packing-speedup` times slower (default 1.0: packing gains
nothing, since no GPU measurement of it exists here).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.catalog import DATASETS, DatasetSpec, dataset_spec
from pipeline.io import write_json
from pipeline.methods import method_class
from pipeline.methods.mst.settings import ABLATION_SETTINGS, MST_VARIANTS, STAGE_SETTINGS
from pipeline.orchestration.config import Params, load_params

# Paper Table 6 (one A100, AV-MNIST): MST-Distill's training time and memory, and its ratios to KD.
PAPER_TABLE6 = {"dataset": "av_mnist", "mst_s": 1942.0, "mst_gb": 53.6, "time_ratio": 4.4, "memory_ratio": 5.9}
TARGETS = ("m1", "m2")
ROLES = ("mm", "m1", "m2")
# What each stage reads (orchestration/mst.py, distill.py); a variant's phases read their own earlier phases.
STAGE_INPUTS = {"teachers": (), "distill": ("teachers",), "mst_s1": (), "mst_s2": ("mst_s1",),
                "mst_s3": ("mst_s2",), "mst_ablation": ("teachers", "mst_s1", "mst_s2"),
                "mst_topk_sweep": ("mst_s1", "mst_s2")}
PHASES = ("collaborative_init", "specialist_adaptation", "dynamic_distillation")


class GridCostError(SystemExit):
    """A measurement or input the estimate needs is missing or malformed; the one-line message names it."""


@dataclass(frozen=True)
class Part:
    """One stretch of training inside a job: `runs` trainings of `epochs` epochs at `epoch_s` seconds each."""

    item: str           # what is trained, e.g. "kd (cm)", "phase 3", "ablation (b)"
    runs: int
    epochs: int
    epoch_s: float
    source: str         # which approximation gave epoch_s
    one_off: bool = False  # a phase before a run's main one (FitNets' hint phase): part of that run, not a run

    @property
    def seconds(self) -> float:
        return self.runs * self.epochs * self.epoch_s


@dataclass(frozen=True)
class Job:
    """One schedulable unit (one `run_jobs` job): its parts run one after another on one device."""

    dataset: str
    stage: str                  # reported stage, e.g. "distill", "mst_variants"
    group: str                  # scheduling group it belongs to (a stage, or a variant's phase)
    after: tuple[str, ...]      # groups of the same dataset that must finish first
    parts: tuple[Part, ...]

    @property
    def seconds(self) -> float:
        return sum(part.seconds for part in self.parts)

    @property
    def runs(self) -> int:
        """Trainings (MLflow runs) in the job; a one-off phase belongs to its run."""
        return sum(part.runs for part in self.parts if not part.one_off)


class EpochTimes:
    """Per-epoch seconds of (dataset, network role, method, teacher config), from dataset_epoch_time's JSON and
    method_cost's AV-Digits ratios, with the approximation each answer used."""

    def __init__(self, measurements: dict, path: Path | str, method_cost: dict | None = None) -> None:
        self.path = str(path)
        self.machine = measurements.get("machine", {})
        try:
            rows = measurements["measurements"]
            self.measured_methods = set(measurements.get("methods") or {r["method"] for r in rows})
            self.skipped = {(s["dataset"], s["method"]) for s in measurements.get("skipped", [])}
            self.rows = {(r["dataset"], r["role"], r["method"], r["teacher"]): r for r in rows}
        except (KeyError, TypeError) as err:
            raise GridCostError(f"{self.path}: expected dataset_epoch_time's --json output (measurements with "
                                f"dataset, role, method, teacher, epoch_s); missing {err}") from None
        self.ratios = {(r["method"], r["target"], r["teacher"]): r for r in (method_cost or {}).get("rows", [])}

    def _measured(self, dataset: str, role: str, method: str, teacher: str) -> tuple[dict, str] | None:
        exact = self.rows.get((dataset, role, method, teacher))
        if exact is not None:
            return exact, "measured"
        for (d, r, m, t), row in self.rows.items():
            if (d, r, m) == (dataset, role, method):
                return row, f"measured ({t} teacher)"
        return None

    def _required(self, dataset: str, method: str) -> bool:
        return method in self.measured_methods and (dataset, method) not in self.skipped

    def _missing(self, dataset: str, role: str, method: str) -> GridCostError:
        network = dataset_spec(dataset).networks[role]
        return GridCostError(f"{self.path}: no measurement of ({dataset}, {network}, {method}); expected one "
                             f"(python -m benchmarks.dataset_epoch_time --datasets {dataset} --methods {method}) or "
                             f"({dataset}, {method}) listed as skipped")

    def ce(self, dataset: str, role: str) -> float:
        """The measured CE epoch of `role`'s network (the teachers stage's runs); an error if absent."""
        found = self._measured(dataset, role, "ce", "none")
        if found is None:
            raise self._missing(dataset, role, "ce")
        return found[0]["epoch_s"]

    def epoch(self, dataset: str, role: str, method: str, teacher: str) -> tuple[float, str]:
        """Seconds of one main-phase epoch and the approximation used (see the module docstring)."""
        found = self._measured(dataset, role, method, teacher)
        if found is not None:
            return found[0]["epoch_s"], found[1]
        if self._required(dataset, method):
            raise self._missing(dataset, role, method)
        if teacher == "mm+cm" and not method.startswith("mst"):  # builds its own peers: trains all three
            return sum(self.ce(dataset, r) for r in ROLES), "Σ CE of mm, m1, m2"
        kd = self._measured(dataset, role, "kd", teacher) if method != "kd" else None
        ratio = self._ratio(method, role, teacher, "kd" if kd is not None else "ce")
        if kd is not None:
            if ratio is None:
                return kd[0]["epoch_s"], "KD's epoch"
            return ratio * kd[0]["epoch_s"], "ratio×KD"
        if self._required(dataset, "kd"):
            raise self._missing(dataset, role, "kd")
        ce = self.ce(dataset, role)
        return (ratio * ce, "ratio×CE") if ratio is not None else (ce, "CE's epoch")

    def _ratio(self, method: str, role: str, teacher: str, reference: str) -> float | None:
        """method_cost's epoch of `method` over KD's (same target, teacher config, else MM) or the plain one."""
        row = self.ratios.get((method, role, teacher))
        if row is None:
            return None
        if reference == "ce":
            return row["x_plain"]
        kd = self.ratios.get(("kd", role, teacher)) or self.ratios.get(("kd", role, "mm"))
        return row["epoch_s"] / kd["epoch_s"] if kd else None

    def one_off_per_epoch(self, dataset: str, role: str, method: str, teacher: str,
                          avd_epochs: int) -> tuple[float, str]:
        """Seconds per epoch of a baseline's one-off phases (hint, co-training; salience included): method_cost's
        one-off time per AV-Digits phase epoch over its KD (else plain) epoch, times that epoch here."""
        kd_here = self._measured(dataset, role, "kd", teacher)
        name, here = ("KD", kd_here[0]["epoch_s"]) if kd_here else ("CE", self.ce(dataset, role))
        row = self.ratios.get((method, role, teacher))
        reference = (self.ratios.get(("kd", role, teacher)) or self.ratios.get(("kd", role, "mm")) if kd_here
                     else self.ratios.get(("ce", role, "none")))
        if row is None or reference is None or avd_epochs == 0:
            return here, f"{name}'s epoch"
        return row["prepare_s"] / avd_epochs / reference["epoch_s"] * here, f"one-off ratio×{name}"

    def peak_mb(self, dataset: str, method: str) -> float | None:
        peaks = [r["peak_mb"] for (d, _, m, _), r in self.rows.items() if (d, m) == (dataset, method)]
        return max(peaks) if peaks else None


# ---- the grid ----

def _one_off_epochs(method_params, dataset: str) -> int:
    """Epochs of a baseline's phases before its main one: its params' per-dataset `<phase>_epochs` fields."""
    if method_params is None or not dataclasses.is_dataclass(method_params):
        return 0
    return sum(getattr(method_params, f.name).get(dataset, 0) for f in dataclasses.fields(method_params)
               if f.name.endswith("_epochs") and isinstance(getattr(method_params, f.name), dict))


def _teacher_roles(teacher_set: str, target: str) -> tuple[str, ...]:
    """The networks of MST-Distill's teacher set for `target`: the MM one and/or the other modality's."""
    return tuple({"mm": "mm", "cm": DatasetSpec.other(target)}[t] for t in teacher_set.split("+"))


def dataset_jobs(params: Params, dataset: str, seeds: int, times: EpochTimes, studies: bool) -> list[Job]:
    """Every job of `dataset`'s grid at `seeds` seeds (see the module docstring)."""
    spec = dataset_spec(dataset)
    train, teach = params.training[dataset], params.teacher_training[dataset]
    jobs: list[Job] = []

    def add(stage: str, parts: list[Part], group: str | None = None, after: tuple[str, ...] | None = None):
        jobs.append(Job(dataset, stage, group or stage, STAGE_INPUTS.get(stage, ()) if after is None else after,
                        tuple(parts)))

    for _ in range(seeds):
        for role in ROLES:
            add("teachers", [Part(f"ce {role}", 1, teach.epochs, times.ce(dataset, role), "measured")])
        if teach != train:  # the w/o KD rows are their own runs
            for role in TARGETS:
                add("teachers", [Part(f"ce {role} (w/o KD)", 1, train.epochs, times.ce(dataset, role), "measured")])
    segmentation = spec.task == "segmentation"
    baselines = ([m for m in params.segmentation.methods if method_class(m).segmentation] if segmentation
                 else params.methods)
    for method in baselines:
        method_params = params.method(method)
        configs = tuple(getattr(method_params, "teachers", method_class(method).teacher_configs))
        one_off = _one_off_epochs(method_params, dataset)
        avd_one_off = _one_off_epochs(method_params, "av_digits")
        for _ in range(seeds):
            for target in TARGETS:
                for config in configs:
                    seconds, source = times.epoch(dataset, target, method, config)
                    parts = []
                    if one_off:
                        extra_s, extra_source = times.one_off_per_epoch(dataset, target, method, config, avd_one_off)
                        parts.append(Part(f"{method} ({config}) one-off phases", 1, one_off, extra_s, extra_source,
                                          one_off=True))
                    parts.append(Part(f"{method} ({config})", 1, train.epochs, seconds, source))
                    add("distill", parts)
    mst = params.method("mst")
    _mst_jobs(add, mst, dataset, seeds, times, train.epochs, ["mst_s1", "mst_s2", "mst_s3"], STAGE_INPUTS)
    if studies:
        phase3 = {t: _as_default_phase3(times.epoch(dataset, t, "mst", "mm+cm")) for t in TARGETS}
        for _ in range(seeds):
            for target in TARGETS:
                parts = []
                if any(STAGE_SETTINGS[s].s2 and not STAGE_SETTINGS[s].s1 for s in ABLATION_SETTINGS):
                    s2 = sum(times.ce(dataset, r) for r in _teacher_roles(mst.teacher_set, target))
                    parts.append(Part("phase 2 (independent teachers)", 1, mst.specialist_adaptation_epochs[dataset],
                                      s2, "Σ CE of its teachers"))
                parts += [Part(f"ablation ({s})", 1, train.epochs, *phase3[target]) for s in ABLATION_SETTINGS]
                add("mst_ablation", parts)
        for k in range(1, mst.n_specialists + 1):
            for _ in range(seeds):
                for target in TARGETS:
                    add("mst_topk_sweep", [Part(f"phase 3 (top-{k})", 1, train.epochs, *phase3[target])])
        for name, variant in MST_VARIANTS.items():
            varied = dataclasses.replace(mst, **variant.overrides)
            first = PHASES.index(variant.first_phase)
            groups = [f"mst_variants/{name}/s{i + 1}" for i in range(3)]
            # its first phase reads the default pipeline's earlier phases, each later one its own previous phase
            inputs = {groups[i]: (groups[i - 1],) if i > first else tuple(f"mst_s{j + 1}" for j in range(i))
                      for i in range(first, 3)}
            _mst_jobs(add, varied, dataset, seeds, times, train.epochs, groups, inputs, first=first,
                      stage="mst_variants", label=f" ({name})")
    return jobs


def _mst_jobs(add, mst, dataset: str, seeds: int, times: EpochTimes, epochs: int, groups: list[str],
              inputs: dict[str, tuple[str, ...]], first: int = 0, stage: str | None = None, label: str = "") -> None:
    """MST-Distill's phases from index `first` on (s1 per seed, s2 and s3 per seed and target) as jobs of the
    scheduling `groups` (one per phase), each after its `inputs`; `epochs`: phase 3's budget."""
    for _ in range(seeds):
        if first == 0:
            add(stage or groups[0], [Part(f"phase 1{label}", 1, mst.collaborative_init_epochs[dataset],
                                          sum(times.ce(dataset, r) for r in ROLES), "Σ CE of mm, m1, m2")],
                group=groups[0], after=inputs[groups[0]])
        for target in TARGETS:
            if first <= 1:
                s2 = sum(times.ce(dataset, r) for r in _teacher_roles(mst.teacher_set, target))
                add(stage or groups[1], [Part(f"phase 2{label}", 1, mst.specialist_adaptation_epochs[dataset], s2,
                                              "Σ CE of its teachers")], group=groups[1], after=inputs[groups[1]])
            phase3 = times.epoch(dataset, target, "mst", "mm+cm")
            add(stage or groups[2], [Part(f"phase 3{label}", 1, epochs, *(_as_default_phase3(phase3) if stage
                                                                          else phase3))],
                group=groups[2], after=inputs[groups[2]])


def _as_default_phase3(epoch: tuple[float, str]) -> tuple[float, str]:
    """A study's phase 3 (a Table 3 setting, a top-k, a variant) costed as the default phase 3, and labelled so."""
    return epoch[0], f"{epoch[1]} (default phase 3)"


# ---- the schedule ----

def lpt_schedule(jobs: list[Job], devices: int, runs_per_device: int = 1,
                 packing_speedup: float = 1.0) -> list[tuple[float, float]]:
    """(start, finish) of each of `jobs` in a longest-processing-time-first list schedule over `devices` ×
    `runs_per_device` slots, each job `runs_per_device / packing_speedup` times slower than alone: whenever a slot
    is free it takes the longest ready job, a job being ready once every group in its `after` has finished on its
    dataset."""
    if devices < 1 or runs_per_device < 1:
        raise GridCostError(f"--gpus {devices} / --runs-per-gpu {runs_per_device}: expected whole numbers >= 1")
    if not 0 < packing_speedup <= runs_per_device:
        raise GridCostError(f"--packing-speedup {packing_speedup}: expected a number in (0, --runs-per-gpu = "
                            f"{runs_per_device}]; K runs sharing a device cannot do more than K runs' work")
    stretch = runs_per_device / packing_speedup
    left: dict[tuple[str, str], int] = defaultdict(int)  # unfinished jobs per (dataset, group); absent group: 0
    for job in jobs:
        left[(job.dataset, job.group)] += 1
    waiting = list(range(len(jobs)))
    ready: list[tuple[float, int]] = []
    running: list[tuple[float, int]] = []
    times: list[tuple[float, float]] = [(math.nan, math.nan)] * len(jobs)
    free, now = devices * runs_per_device, 0.0

    def release() -> None:
        nonlocal waiting
        still = []
        for i in waiting:
            if all(left[(jobs[i].dataset, group)] == 0 for group in jobs[i].after):
                heapq.heappush(ready, (-jobs[i].seconds, i))  # longest first; ties in job order
            else:
                still.append(i)
        waiting = still

    release()
    while ready or running:
        while free and ready:
            _, i = heapq.heappop(ready)
            times[i] = (now, now + jobs[i].seconds * stretch)
            heapq.heappush(running, (times[i][1], i))
            free -= 1
        now, i = heapq.heappop(running)
        free += 1
        left[(jobs[i].dataset, jobs[i].group)] -= 1
        if left[(jobs[i].dataset, jobs[i].group)] == 0:
            release()
    if waiting:  # a dependency cycle: cannot happen with STAGE_INPUTS, guarded all the same
        raise GridCostError(f"jobs wait on stages that never finish: "
                            f"{sorted({g for i in waiting for g in jobs[i].after})}")
    return times


def lpt_makespan(jobs: list[Job], devices: int, runs_per_device: int = 1, packing_speedup: float = 1.0) -> float:
    """When the last job of `lpt_schedule` finishes (0 for no jobs)."""
    return max((finish for _, finish in lpt_schedule(jobs, devices, runs_per_device, packing_speedup)), default=0.0)


# ---- inputs and output ----

def read_json(path: Path | str, what: str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GridCostError(f"{path}: file not found; expected {what}") from None
    except json.JSONDecodeError as err:
        raise GridCostError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); expected {what}") from None


def parse_method_cost(text: str, source: str = "method_cost output") -> dict:
    """method_cost.py's printed table as {"header": its first line, "rows": [{method, target, teacher, epoch_s,
    x_plain, prepare_s, peak_mb, x_kd_mem}]}."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.split()[:3] == ["method", "target", "teacher"]), None)
    if start is None:
        raise GridCostError(f"{source}: no 'method target teacher ...' table; expected the printed output of "
                            "python -m benchmarks.method_cost")
    rows = []
    for line in lines[start + 1:]:
        fields = line.split()
        if len(fields) != 8:
            continue
        numbers = [float(v) for v in fields[3:]]
        rows.append(dict(zip(("method", "target", "teacher"), fields[:3]))
                    | dict(zip(("epoch_s", "x_plain", "prepare_s", "peak_mb", "x_kd_mem"), numbers)))
    header = next((line for line in lines if line.startswith("device ")), "")
    return {"header": header, "rows": rows}


def summarise(jobs: list[Job]) -> dict:
    """Runs, device-seconds and device-seconds per approximation for each (dataset, stage); runs, seconds, epochs
    and approximations for each (dataset, stage, item)."""
    stages: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0, defaultdict(float)])
    items: dict[tuple[str, str, str], dict] = {}
    for job in jobs:
        stages[(job.dataset, job.stage)][0] += job.runs
        stages[(job.dataset, job.stage)][1] += job.seconds
        for part in job.parts:
            stages[(job.dataset, job.stage)][2][part.source] += part.seconds
            key = (job.dataset, job.stage, _item_name(part.item))
            entry = items.setdefault(key, {"runs": 0, "seconds": 0.0, "epochs": set(), "sources": set()})
            entry["runs"] += 0 if part.one_off else part.runs
            entry["seconds"] += part.seconds
            entry["epochs"].add(part.epochs)
            entry["sources"].add(part.source)
    return {"stages": stages, "items": items}


def _item_name(item: str) -> str:
    """Parts shown as one row: both unimodal teachers, every Table 3 setting, every top-k."""
    if item.startswith("ablation ("):
        return "phase 3, every Table 3 setting"
    if item.startswith("phase 3 (top-"):
        return "phase 3, every top-k"
    return {"ce m1": "ce m1, m2", "ce m2": "ce m1, m2"}.get(item, item)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f}"


def paper_comparison(times: EpochTimes, params: Params) -> dict | None:
    """This estimate's Table 6 pipelines on AV-MNIST, per seed and both targets (reporting/paper_outputs.py's
    definition): MST-Distill = phases 1-3; KD = the three teachers plus KD (MM) and KD (CM) students."""
    d = PAPER_TABLE6["dataset"]
    if not any(key[0] == d for key in times.rows):
        return None
    mst, train, teach = params.method("mst"), params.training[d], params.teacher_training[d]
    s1 = mst.collaborative_init_epochs[d] * sum(times.ce(d, r) for r in ROLES)
    s2 = sum(mst.specialist_adaptation_epochs[d] * sum(times.ce(d, r) for r in _teacher_roles(mst.teacher_set, t))
             for t in TARGETS)
    s3 = sum(train.epochs * times.epoch(d, t, "mst", "mm+cm")[0] for t in TARGETS)
    teachers = teach.epochs * sum(times.ce(d, r) for r in ROLES)
    kd = teachers + sum(train.epochs * times.epoch(d, t, "kd", c)[0] for t in TARGETS for c in ("mm", "cm"))
    mst_peak, kd_peak = times.peak_mb(d, "mst"), times.peak_mb(d, "kd")
    return {"mst_s": s1 + s2 + s3, "kd_s": kd, "time_ratio": (s1 + s2 + s3) / kd,
            "memory_ratio": mst_peak / kd_peak if mst_peak and kd_peak else None, "mst_peak_mb": mst_peak,
            "paper": PAPER_TABLE6 | {"kd_s": PAPER_TABLE6["mst_s"] / PAPER_TABLE6["time_ratio"]}}


def calibrated_to_paper(paper: dict) -> float:
    """The factor from this estimate's device to the paper's A100: the paper's MST-Distill time on AV-MNIST
    (Table 6, 1,942 s) over this estimate's time for the same pipeline."""
    return paper["paper"]["mst_s"] / paper["mst_s"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epoch-times", type=Path, default=Path("benchmarks/results/epoch_times_cpu.json"))
    p.add_argument("--method-cost", type=Path, default=Path("benchmarks/results/method_cost_cpu.json"),
                   help="method_cost's ratios (JSON from --import-method-cost); 'none' for KD's epoch everywhere")
    p.add_argument("--datasets", nargs="+", default=[k for k, s in DATASETS.items() if s.in_paper])
    p.add_argument("--studies", nargs="*", default=None, help="datasets of Table 3, Fig. 6 and the variants "
                                                              "(default: every classification dataset)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per cell (the paper: 5)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--runs-per-gpu", type=int, default=1)
    p.add_argument("--packing-speedup", type=float, default=1.0)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--detail", action="store_true", help="also a row per method, phase and setting")
    p.add_argument("--json", type=Path, default=None, help="write the estimate (or the imported table) here")
    p.add_argument("--import-method-cost", type=Path, default=None, metavar="LOG",
                   help="convert method_cost's printed output to JSON (--json) and exit")
    args = p.parse_args(argv)
    if args.import_method_cost is not None:
        if args.json is None:
            raise GridCostError("--import-method-cost: expected --json OUT for the converted table")
        table = parse_method_cost(args.import_method_cost.read_text(), str(args.import_method_cost))
        write_json(args.json, table)
        print(f"{args.json}: {len(table['rows'])} method_cost rows")
        return
    if args.seeds < 1:
        raise GridCostError(f"--seeds {args.seeds}: expected at least 1")
    for d in args.datasets:
        if d not in DATASETS:
            raise GridCostError(f"--datasets {d}: unknown dataset; known: {', '.join(DATASETS)}")
    params = load_params(args.params, restrict=False)
    method_cost = None if str(args.method_cost) == "none" else read_json(args.method_cost, "method_cost rows "
                                                                         "(--import-method-cost)")
    times = EpochTimes(read_json(args.epoch_times, "dataset_epoch_time's --json output"), args.epoch_times,
                       method_cost)
    studies = ([d for d in args.datasets if DATASETS[d].task == "classification"] if args.studies is None
               else args.studies)
    for d in studies:
        if d not in args.datasets or DATASETS[d].task != "classification":
            raise GridCostError(f"--studies {d}: expected classification datasets of --datasets "
                                f"({', '.join(x for x in args.datasets if DATASETS[x].task == 'classification')})")
    jobs = [job for d in args.datasets for job in dataset_jobs(params, d, args.seeds, times, d in studies)]
    report(jobs, times, params, args)


def report(jobs: list[Job], times: EpochTimes, params: Params, args) -> None:
    """Print the per-dataset tables, the approximations, the Ray makespans and the paper's figure; --json."""
    summary = summarise(jobs)
    machine = times.machine
    where = machine.get("gpu_model") or f"CPU {machine.get('cpu_model', '?')}, {machine.get('threads', '?')} threads"
    print(f"Grid cost at {args.seeds} seeds, epoch times from {args.epoch_times} ({where}, torch "
          f"{machine.get('torch', '?')}, {machine.get('date', '?')}); epochs = the params' budgets (upper bound)\n")
    total = sum(job.seconds for job in jobs)
    print(f"{'dataset':13s} {'stage':15s} {'runs':>6s} {'device-h':>10s}  epoch times from")
    for d in args.datasets:
        rows = [(stage, v) for (dd, stage), v in summary["stages"].items() if dd == d]
        for stage, (runs, seconds, sources) in rows:
            shares = sorted(sources.items(), key=lambda kv: -kv[1])
            print(f"{d:13s} {stage:15s} {runs:6d} {_hours(seconds):>10s}  "
                  + ", ".join(f"{name} {share / seconds:.0%}" for name, share in shares))
        print(f"{d:13s} {'total':15s} {sum(v[0] for _, v in rows):6d} {_hours(sum(v[1] for _, v in rows)):>10s}")
    print(f"{'all':13s} {'total':15s} {sum(j.runs for j in jobs):6d} {_hours(total):>10s}")
    if args.detail:
        print(f"\n{'dataset':13s} {'stage':15s} {'item':34s} {'runs':>5s} {'epochs':>7s} {'device-h':>9s}  "
              "epoch time from")
        for (d, stage, item), v in summary["items"].items():
            print(f"{d:13s} {stage:15s} {item:34s} {v['runs']:5d} {'/'.join(map(str, sorted(v['epochs']))):>7s} "
                  f"{_hours(v['seconds']):>9s}  {', '.join(sorted(v['sources']))}")
    print(f"\nRay, {args.runs_per_gpu} job(s) per GPU at packing speed-up {args.packing_speedup} (LPT list schedule, "
          f"stage order kept; {len(jobs)} jobs):")
    makespans = {}
    for n in args.gpus:
        span = lpt_makespan(jobs, n, args.runs_per_gpu, args.packing_speedup)
        makespans[n] = span
        bound = max(total / (n * args.packing_speedup),
                    max(j.seconds for j in jobs) * args.runs_per_gpu / args.packing_speedup)
        print(f"  {n:3d} GPU(s): {_hours(span):>10s} h  ({span / 86400:,.1f} days; {total / span:.2f}× one device, "
              f"lower bound {_hours(bound)} h)")
    paper = paper_comparison(times, params)
    if paper:
        ref = paper["paper"]
        memory = f", memory {paper['memory_ratio']:.1f}×" if paper["memory_ratio"] else ""
        print(f"\nAV-MNIST, per seed and both targets (Table 6's pipelines), on this estimate's device: MST-Distill "
              f"phases 1-3 {paper['mst_s']:,.0f} s, KD pipeline {paper['kd_s']:,.0f} s, MST-Distill / KD "
              f"{paper['time_ratio']:.1f}× time{memory} (MST peak of phase 3 only)\n"
              f"paper Table 6 (one A100): MST-Distill {ref['mst_s']:,.0f} s and {ref['mst_gb']} GB, "
              f"{ref['time_ratio']}× the time and {ref['memory_ratio']}× the memory of KD "
              f"(KD ≈ {ref['kd_s']:,.0f} s)")
        paper["a100_scale"] = a100 = calibrated_to_paper(paper)
        print(f"\nScaled to the paper's A100 by that one pipeline (this device's MST-Distill AV-MNIST pipeline is "
              f"{1 / a100:,.0f}× the paper's {ref['mst_s']:,.0f} s; one factor for every network and method, so "
              f"an order of magnitude, not a plan):\n  1 GPU: {_hours(total * a100)} A100-hours")
        for n, span in makespans.items():
            if n > 1:
                print(f"  {n} GPUs with Ray: {_hours(span * a100)} h")
    if args.json is not None:
        write_json(args.json, {
            "epoch_times": str(args.epoch_times), "machine": machine, "seeds": args.seeds,
            "datasets": args.datasets, "runs_per_gpu": args.runs_per_gpu, "packing_speedup": args.packing_speedup,
            "total_device_s": total, "makespan_s": {str(n): s for n, s in makespans.items()},
            "stages": [{"dataset": d, "stage": s, "runs": v[0], "device_s": v[1], "device_s_by_source": dict(v[2])}
                       for (d, s), v in summary["stages"].items()],
            "items": [{"dataset": d, "stage": s, "item": i, "runs": v["runs"], "device_s": v["seconds"],
                       "epochs": sorted(v["epochs"]), "sources": sorted(v["sources"])}
                      for (d, s, i), v in summary["items"].items()],
            "paper_table6": paper})


if __name__ == "__main__":
    main(sys.argv[1:])
