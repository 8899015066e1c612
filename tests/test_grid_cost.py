"""benchmarks/grid_cost.py: the grid derived from params, its cost from hand-made measurements with round numbers
against hand-computed totals, the LPT makespan, the stage order of the schedule, and the one-line errors."""

from __future__ import annotations

import json

import pytest

from benchmarks.grid_cost import (EpochTimes, GridCostError, Job, Part, dataset_jobs, lpt_makespan, lpt_schedule,
                                  main, parse_method_cost)
from pipeline.orchestration.config import parse_params
from tests.conftest import raw_params

# AV-MNIST per-epoch seconds: CE of mm, m1, m2; KD and MST phase 3 of m1, m2
CE = {"mm": 10.0, "m1": 2.0, "m2": 4.0}
KD = {"m1": 3.0, "m2": 5.0}
MST = {"m1": 4.0, "m2": 6.0}
NETS = {"mm": "cnn_i", "m1": "lenet5", "m2": "three_layer_cnn_a"}


def measurements(skip_mst: bool = False, drop: tuple[str, str] | None = None) -> dict:
    rows = [{"dataset": "av_mnist", "role": r, "network": NETS[r], "method": "ce", "teacher": "none",
             "epoch_s": s, "peak_mb": 1.0} for r, s in CE.items()]
    rows += [{"dataset": "av_mnist", "role": r, "network": NETS[r], "method": "kd", "teacher": "mm",
              "epoch_s": s, "peak_mb": 2.0} for r, s in KD.items()]
    if not skip_mst:
        rows += [{"dataset": "av_mnist", "role": r, "network": NETS[r], "method": "mst", "teacher": "mm+cm",
                  "epoch_s": s, "peak_mb": 8.0} for r, s in MST.items()]
    rows = [r for r in rows if (r["role"], r["method"]) != drop]
    return {"machine": {"device": "cpu"}, "datasets": ["av_mnist"], "methods": ["ce", "kd", "mst"],
            "skipped": [{"dataset": "av_mnist", "method": "mst"}] if skip_mst else [], "measurements": rows}


# method_cost on AV-Digits: epoch s, × plain, one-off s
METHOD_COST = """device cpu, torch threads 1, 1000 samples (600 train), spectrogram 16×16, batch 32, 1 timed epochs

method        target teacher  epoch s  × plain prepare s  peak MB × KD mem
ce            m1     none       0.100     1.00      0.00     43.3     0.41
kd            m1     mm         0.100     1.00      0.36    105.6     1.00
fitnets       m1     mm         0.200     2.00      1.00    135.0     1.28
mst           m1     mm+cm      0.300     3.00      2.57    117.4     1.11
mst           m2     mm+cm      0.150     1.50      1.95    127.2     1.20
kd            m2     mm         0.100     1.00      0.27    105.8     1.00
"""


def tiny_params(methods: list[str]):
    """The real params.yaml with a few baselines and round AV-MNIST budgets: 10 epochs (teachers and students
    alike: no separate w/o KD runs), MST phases 1 and 2 at 2 and 3 epochs, FitNets' hint phase at 4 (AV-Digits 2)."""
    raw = raw_params()
    raw["methods"] = methods
    for block in ("training", "teacher_training"):
        raw[block]["av_mnist"]["epochs"] = 10
    raw["mst"]["collaborative_init_epochs"]["av_mnist"] = 2
    raw["mst"]["specialist_adaptation_epochs"]["av_mnist"] = 3
    raw["fitnets"]["hint_epochs"].update(av_mnist=4, av_digits=2)
    return parse_params(raw)


def test_totals_of_a_tiny_grid_match_hand_computed_values():
    times = EpochTimes(measurements(), "m.json")
    jobs = dataset_jobs(tiny_params(["kd", "dml"]), "av_mnist", seeds=1, times=times, studies=False)
    by_stage: dict[str, float] = {}
    for job in jobs:
        by_stage[job.stage] = by_stage.get(job.stage, 0.0) + job.seconds
    # teachers: 10 epochs of each CE; KD: MM and CM teachers x both targets; DML (mm+cm, not measured): the sum of
    # the three CE epochs per target; s1: 2 epochs of that sum; s2: 3 epochs of the teachers' CE (mm + other);
    # s3: 10 epochs of phase 3
    assert by_stage == pytest.approx({"teachers": 10 * 16, "distill": 10 * (2 * 3 + 2 * 5) + 2 * 10 * 16,
                                      "mst_s1": 2 * 16, "mst_s2": 3 * (10 + 4) + 3 * (10 + 2),
                                      "mst_s3": 10 * 4 + 10 * 6})
    assert sum(job.seconds for job in jobs) == pytest.approx(850)
    assert sum(job.runs for job in jobs) == 3 + 4 + 2 + 1 + 2 + 2
    assert lpt_makespan(jobs, 1) == pytest.approx(850)
    # two devices, by hand: 0-100 ce mm | 0-40 ce m2, 40-72 s1, 72-114 s2 m1, 114-134 ce m1; 100-136 s2 m2; then
    # (teachers done at 134, s2 at 136) dml 134-294 | 136-296, s3 m2 294-354, kd m2 296-346, 346-396, s3 m1
    # 354-394, kd m1 394-424 | 396-426
    assert lpt_makespan(jobs, 2) == pytest.approx(426)


def test_five_seeds_and_the_studies_multiply_runs_as_the_orchestration_does():
    params = tiny_params(["kd"])
    times = EpochTimes(measurements(), "m.json")
    runs: dict[str, int] = {}
    for job in dataset_jobs(params, "av_mnist", seeds=5, times=times, studies=True):
        runs[job.stage] = runs.get(job.stage, 0) + job.runs
    n = params.method("mst").n_specialists
    assert runs == {"teachers": 15, "distill": 5 * 2 * 2, "mst_s1": 5, "mst_s2": 10, "mst_s3": 10,
                    "mst_ablation": 5 * 2 * (7 + 1),  # 7 settings and one shared phase-2 run per seed and target
                    "mst_topk_sweep": 5 * 2 * n,
                    # s1_detached: s1, s2, s3; lb_cv: s3; teachers_mm, teachers_cm: s2, s3
                    "mst_variants": 5 * (1 + 2 + 2) + 5 * 2 + 2 * 5 * (2 + 2)}


def test_lpt_takes_the_longest_ready_job_first():
    jobs = [Job("d", "teachers", "teachers", (), (Part("x", 1, 1, s, "measured"),)) for s in (5, 7, 3, 6, 4)]
    # LPT: 7 | 6, then 5 on the device free at 6 (11), 4 at 7 (11), 3 at 11: 14 (the optimum is 13)
    assert lpt_makespan(jobs, 2) == 14
    assert lpt_makespan(jobs, 5) == 7
    # packing: 2 runs per device each twice as slow gains nothing at speed-up 1, halves the time at 2
    assert lpt_makespan(jobs[:2], 1, runs_per_device=2) == 2 * 7
    assert lpt_makespan(jobs[:2], 1, runs_per_device=2, packing_speedup=2.0) == 7
    with pytest.raises(GridCostError, match="--packing-speedup 3.0"):
        lpt_makespan(jobs, 1, runs_per_device=2, packing_speedup=3.0)


def test_the_schedule_keeps_the_stage_order():
    times = EpochTimes(measurements(), "m.json")
    jobs = dataset_jobs(tiny_params(["kd", "dml"]), "av_mnist", seeds=3, times=times, studies=True)
    for devices in (1, 3, 64):
        schedule = lpt_schedule(jobs, devices)
        end = {}
        for job, (_, finish) in zip(jobs, schedule):
            end[job.group] = max(end.get(job.group, 0.0), finish)
        for job, (start, _) in zip(jobs, schedule):
            assert job.after or job.group in ("teachers", "mst_s1", "mst_variants/s1_detached/s1")
            for group in job.after:
                assert start >= end[group] - 1e-9, (job.group, group)
        distill = min(start for job, (start, _) in zip(jobs, schedule) if job.stage == "distill")
        assert distill >= end["teachers"]
        assert min(s for j, (s, _) in zip(jobs, schedule) if j.group == "mst_s3") >= end["mst_s2"] >= end["mst_s1"]


def test_unmeasured_methods_use_method_cost_ratios_and_say_so():
    times = EpochTimes(measurements(skip_mst=True), "m.json", parse_method_cost(METHOD_COST))
    jobs = dataset_jobs(tiny_params(["fitnets"]), "av_mnist", seeds=1, times=times, studies=False)
    parts = [(p.item, p.source, p.epochs, p.epoch_s) for job in jobs for p in job.parts
             if job.stage in ("distill", "mst_s3")]
    # FitNets (MM) on m1: 0.2/0.1 x KD's 3 s; m2 has no method_cost row: KD's 5 s; the CM rows: KD's epoch too
    assert [(s, e) for item, s, _, e in parts if item == "fitnets (mm)"] == [("ratio×KD", 6.0), ("KD's epoch", 5.0)]
    # its hint phase, 4 epochs here: 1.0 s over 2 AV-Digits epochs, per KD epoch (0.1 s), x KD's 3 s
    assert [(s, n, e) for item, s, n, e in parts if item == "fitnets (mm) one-off phases"] == [
        ("one-off ratio×KD", 4, pytest.approx(15.0)), ("KD's epoch", 4, 5.0)]
    # the hint phase is part of its run: 2 targets x 2 teacher configs are 4 distill runs
    assert sum(job.runs for job in jobs if job.stage == "distill") == 4
    # MST phase 3, skipped on purpose: method_cost's MST/KD ratios (3, 1.5) x KD's epochs (3, 5)
    assert [(s, e) for item, s, _, e in parts if item == "phase 3"] == [("ratio×KD", pytest.approx(9.0)),
                                                                         ("ratio×KD", pytest.approx(7.5))]


def test_a_missing_measurement_is_one_line_naming_it_and_the_file(tmp_path):
    path = tmp_path / "epoch_times.json"
    path.write_text(json.dumps(measurements(drop=("m2", "kd"))))
    with pytest.raises(SystemExit) as err:
        main(["--epoch-times", str(path), "--method-cost", "none", "--datasets", "av_mnist", "--seeds", "1"])
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "(av_mnist, three_layer_cnn_a, kd)" in message


def test_the_script_prints_and_writes_the_estimate(tmp_path, capsys):
    epochs, costs, out = tmp_path / "e.json", tmp_path / "c.json", tmp_path / "grid.json"
    epochs.write_text(json.dumps(measurements()))
    log = tmp_path / "method_cost.log"
    log.write_text(METHOD_COST)
    main(["--import-method-cost", str(log), "--json", str(costs)])
    assert len(json.loads(costs.read_text())["rows"]) == 6
    main(["--epoch-times", str(epochs), "--method-cost", str(costs), "--datasets", "av_mnist", "--seeds", "2",
          "--gpus", "1", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["makespan_s"]["1"] == pytest.approx(result["total_device_s"])
    assert result["total_device_s"] / 4 <= result["makespan_s"]["4"] < result["total_device_s"]
    assert sum(s["device_s"] for s in result["stages"]) == pytest.approx(result["total_device_s"])
    assert "paper Table 6 (one A100): MST-Distill 1,942 s" in printed and "KD ≈ 441 s" in printed
    # the A100 scaling: one factor, the paper's MST-Distill time over this estimate's for the same pipeline
    scale = result["paper_table6"]["a100_scale"]
    assert scale == pytest.approx(1942 / result["paper_table6"]["mst_s"])
    assert f"1 GPU: {result['total_device_s'] * scale / 3600:,.1f} A100-hours" in printed
