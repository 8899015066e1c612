"""Tables, figures, metrics and plot data from hand-made run records (the results schema of RunRecord)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest

from pipeline.orchestration.runs import RunRecord
from pipeline.reporting.tables import (ResultsError, read_runs, table1, table1_csv, table1_markdown, table1_rows,
                                       table3, table3_markdown, topk_summary)
from pipeline.reporting.reports import write_reports

NAMES = {"m1": "image", "m2": "audio", "mm": "multimodal"}


def _run(method, teacher, target, seed, acc, stage="distill", setting="default", **extras):
    record = RunRecord(dataset="av_digits", stage=stage, method=method, phase="main", setting=setting, teacher=teacher,
                       target=NAMES[target], seed=seed, epochs=2, best_epoch=1, test_accuracy=acc,
                       test_accuracy_last=acc, best_val_loss=1.0, best_val_accuracy=acc, extras=extras,
                       curve=[{"epoch": 0, "train_loss": 2.0, "val_loss": 1.5, "val_accuracy": acc / 2},
                              {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": acc}])
    return dataclasses.asdict(record)


RUNS = ([_run("ce", "none", t, s, a, "teachers", setting) for t, accs in (("m1", (0.60, 0.62)), ("m2", (0.40, 0.44)))
         for s, a in enumerate(accs) for setting in ("teacher", "wo_kd")]
        + [_run("ce", "none", "mm", s, a, "teachers", "teacher") for s, a in enumerate((0.70, 0.72))]
        + [_run("kd", "mm", "m1", s, a) for s, a in enumerate((0.64, 0.66))]
        + [_run("kd", "cm", "m1", s, a) for s, a in enumerate((0.50, 0.52))]
        + [_run("kd", "mm", "m2", s, a) for s, a in enumerate((0.42, 0.42))])


def test_rows_come_from_the_registry_in_the_papers_order():
    rows = table1_rows()
    assert rows[0].label == "w/o KD" and rows[-1].label == "MST-Distill (MM+CM)"
    assert [r.key for r in rows[1:5]] == ["kd_mm", "kd_cm", "mlld_mm", "mlld_cm"]
    assert [r.label for r in rows if r.method in ("dml", "mgdfr", "c2kd")] == ["DML (MM+CM)", "MGDFR (CM)", "C²KD (CM)"]
    assert len(rows) == 17


def test_cells_are_mean_and_sample_std_in_percent():
    summary = table1(RUNS, ["av_digits"])
    assert summary["av_digits"]["image"]["wo_kd"] == {"mean": 61.0, "std": pytest.approx(1.4142, abs=1e-4), "n": 2}
    assert summary["av_digits"]["audio"]["kd_mm"] == {"mean": 42.0, "std": 0.0, "n": 2}
    assert "kd_cm" not in summary["av_digits"]["audio"]


def test_markdown_marks_best_and_second_best_per_column():
    text = table1_markdown(table1(RUNS, ["av_digits"]), ["av_digits"])
    lines = text.splitlines()
    assert lines[0] == "| Method | AV-Digits Image | AV-Digits Audio |"
    assert lines[2] == "| w/o KD | <u>61.00 ± 1.41</u> | **42.00 ± 2.83** |"
    assert lines[3] == "| KD (MM) | **65.00 ± 1.41** | **42.00 ± 0.00** |"  # tie for best
    assert lines[4] == "| KD (CM) | 51.00 ± 1.41 | – |"


def test_csv_has_one_row_per_method_and_numeric_cells():
    rows = list(csv.DictReader(io.StringIO(table1_csv(table1(RUNS, ["av_digits"]), ["av_digits"]))))
    assert [r["method"] for r in rows] == [row.label for row in table1_rows()]
    assert float(rows[1]["av_digits/image/mean"]) == 65.0 and rows[2]["av_digits/audio/mean"] == ""


def test_write_reports_metrics_plots_and_errors(tmp_path):
    results = tmp_path / "results" / "av_digits"
    results.mkdir(parents=True)
    (results / "all.json").write_text(json.dumps({"runs": RUNS}))
    metrics = write_reports(tmp_path / "results", tmp_path / "reports", ["av_digits"])
    # the metrics are a few table cells' seed means: no std, no n, nothing per seed
    assert metrics["av_digits"]["image"] == {"wo_kd": 61.0, "best_baseline": 65.0}
    assert metrics["av_digits"]["audio"] == {"wo_kd": 42.0, "best_baseline": 42.0}
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "reports" / "table1.md").read_text().startswith("| Method |")
    assert "multimodal | 71.00 ± 1.41" in (tmp_path / "reports" / "teachers.md").read_text()
    curves = list(csv.DictReader((tmp_path / "reports" / "plots" / "learning_curves_av_digits_image.csv").open()))
    assert [r["epoch"] for r in curves] == ["1", "2"]
    assert float(curves[0]["kd_mm"]) == pytest.approx(32.5) and float(curves[1]["wo_kd"]) == pytest.approx(61.0)
    (results / "broken.json").write_text("{not json")
    with pytest.raises(ResultsError, match="broken.json"):
        read_runs(tmp_path / "results", ["av_digits"])
    with pytest.raises(ResultsError, match="no results"):
        read_runs(tmp_path / "results", ["av_mnist"])


def _mst(setting, target, seed, acc, stage="mst_ablation", **extras):
    return _run("mst", "mm+cm", target, seed, acc, stage, setting, **extras)


def test_table3_means_over_targets_and_seeds_and_marks_the_best():
    runs = ([_mst("baseline", t, s, a) for t, s, a in (("m1", 0, .50), ("m2", 0, .30), ("m1", 1, .54), ("m2", 1, .34))]
            + [_mst("full", t, s, a, "mst_s3") for t, s, a in (("m1", 0, .60), ("m2", 0, .40), ("m1", 1, .64),
                                                               ("m2", 1, .44))])
    summary = table3(runs, ["av_digits"])
    # per seed: (50 + 30) / 2 = 40 and (54 + 34) / 2 = 44 -> mean 42, sample std 2.83
    assert summary["av_digits"]["baseline"]["mean"] == {"mean": 42.0, "std": pytest.approx(2.8284, abs=1e-4), "n": 2}
    assert summary["av_digits"]["full"]["image"]["mean"] == 62.0
    lines = table3_markdown(summary, ["av_digits"]).splitlines()
    assert lines[0] == "| Setting | S1 | S2 | S3 | AV-Digits Image | AV-Digits Audio | AV-Digits Mean |"
    assert lines[2] == "| Baseline | ✗ | ✗ | ✗ | <u>52.00 ± 2.83</u> | <u>32.00 ± 2.83</u> | <u>42.00 ± 2.83</u> |"
    assert lines[3].startswith("| (a) | ✓ | ✗ | ✗ | – |")
    assert lines[9] == "| MST-Distill | ✓ | ✓ | ✓ | **62.00 ± 2.83** | **42.00 ± 2.83** | **52.00 ± 2.83** |"


def test_wo_kd_row_reads_only_the_wo_kd_runs():
    runs = [_run("ce", "none", "m1", 0, 0.90, "teachers", "teacher"), _run("ce", "none", "m1", 0, 0.60, "teachers",
                                                                           "wo_kd")]
    assert table1(runs, ["av_digits"])["av_digits"]["image"]["wo_kd"]["mean"] == 60.0


def test_topk_sweep_and_routing_outputs(tmp_path):
    routing = [[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]
    runs = ([_mst("full", t, s, a, "mst_topk_sweep", topk=k) for k, accs in ((1, (0.5, 0.7)), (2, (0.6, 0.6)))
             for t in ("m1", "m2") for s, a in enumerate(accs)]
            + [_mst("full", t, s, 0.6, "mst_s3", topk=1, routing=routing,
                    specialists=["mm:concat_identity", "mm:fc1", "cm:a", "cm:b"]) for t in ("m1", "m2") for s in (0, 1)])
    sweep = topk_summary(runs, "av_digits")
    assert sweep["image"][1]["mean"] == 60.0 and sweep["audio"][2] == {"mean": 60.0, "std": 0.0, "n": 2}
    results = tmp_path / "results" / "av_digits"
    results.mkdir(parents=True)
    (results / "mst.json").write_text(json.dumps({"runs": runs}))
    write_reports(tmp_path / "results", tmp_path / "reports", ["av_digits"])
    reports = tmp_path / "reports"
    assert "| 2 | 60.00 ± 0.00 | 60.00 ± 0.00 |" in (reports / "topk_sweep.md").read_text()
    shares = list(csv.DictReader((reports / "plots" / "routing_av_digits_audio.csv").open()))
    assert shares[1]["mm:fc1"] == "0.25" and list(shares[0]) == ["epoch", "mm:concat_identity", "mm:fc1", "cm:a", "cm:b"]
    for png in ("routing_av_digits_image.png", "fig6_topk_av_digits.png"):
        assert (reports / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _flagged(run: dict, *problems: str) -> dict:
    return {**run, "health": {"verdict": "flagged", "problems": list(problems)}, "run_name": f"distill/x/seed{run['seed']}"}


def test_a_cell_with_a_flagged_seed_carries_a_dagger_and_a_caption():
    runs = [r if not (r["method"] == "kd" and r["teacher"] == "cm" and r["seed"] == 1) else
            _flagged(r, "stayed_at_chance") for r in RUNS]
    text = table1_markdown(table1(runs, ["av_digits"]), ["av_digits"])
    assert "50.00 ± 0.00" not in text and "51.00 ± 1.41 †" in text
    assert "† KD (CM), AV-Digits image: 1 of 2 seeds stayed at chance." in text
    assert text.count("†") == 2  # the cell and its caption line


def _costed(run: dict, seconds: float, peak: float, name: str) -> dict:
    return {**run, "cost": {"train_s": seconds, "peak_mb": peak, "device": "cpu"}, "run_name": name}


def test_paper_outputs_tables_6_7_8_health_and_figures(tmp_path):
    """Table 6 sums each pipeline's runs per seed (phase 1's three records are one run), Tables 7/8 and Fig. 5
    put the default MST-Distill beside its variants, health.md lists each flagged run by its MLflow name."""
    runs = []
    for s in (0, 1):
        runs += [_costed(_run("ce", "none", role, s, 0.5, "teachers", "teacher"), 10.0, 100.0, f"t/{role}/{s}")
                 for role in ("mm", "m1", "m2")]
        runs += [_costed(_run("ce", "none", t, s, 0.5, "teachers", "wo_kd"), 10.0, 100.0, f"t/{t}/{s}")
                 for t in ("m1", "m2")]
        runs += [_costed(_run("kd", c, t, s, 0.6), 5.0, 50.0, f"kd/{c}/{t}/{s}") for c in ("mm", "cm") for t in ("m1", "m2")]
        runs += [_costed(_run("mst", "mm+cm", role, s, 0.5, "mst_s1"), 30.0, 200.0, f"s1/{s}") for role in ("mm", "m1", "m2")]
        runs += [_costed({**_run("mst", "mm+cm", t, s, 0.0, "mst_s2"), "test_accuracy": None}, 5.0, 80.0, f"s2/{t}/{s}") for t in ("m1", "m2")]
        runs += [_costed(_mst("full", t, s, 0.7, "mst_s3"), 15.0, 120.0, f"s3/{t}/{s}") for t in ("m1", "m2")]
        for variant, acc in (("s1_detached", 0.65), ("lb_cv", 0.68), ("teachers_mm", 0.66), ("teachers_cm", 0.62)):
            runs += [{**_mst(variant, t, s, acc, "mst_variants"), "phase": "dynamic_distillation"} for t in ("m1", "m2")]
    runs.append(_flagged(_run("c2kd", "cm", "m1", 0, 0.08), "stayed_at_chance", "constant_prediction"))
    results = tmp_path / "results" / "av_digits"
    results.mkdir(parents=True)
    (results / "all.json").write_text(json.dumps({"runs": runs}))
    write_reports(tmp_path / "results", tmp_path / "reports", ["av_digits"])
    reports = tmp_path / "reports"
    table6 = (reports / "table6.md").read_text()
    # per seed: KD pipeline = 3 teachers x 10 s + 4 KD x 5 s = 50 s; MST = 30 + 2 x 5 + 2 x 15 = 70 s -> 1.40 x
    assert "| KD: teachers (MM, both unimodal) + KD (MM) and KD (CM) students | 50.00 ± 0.00 | 100.0 |" in table6
    assert "| MST-Distill: phases 1, 2 and 3 | 70.00 ± 0.00 | 200.0 |" in table6
    assert "**1.40 ± 0.00 ×** | **2.00 ± 0.00 ×** |" in table6
    assert "| MST-Distill phase 1 (collaborative init., 3 networks) | 2 |" in table6
    table7 = (reports / "table7.md").read_text()
    assert "| Joint (paper) | 70.00 ± 0.00 | 70.00 ± 0.00 | 70.00 ± 0.00 |" in table7
    assert "| Detached (DML-style) | 65.00 ± 0.00 |" in table7
    assert "| CV | 68.00 ± 0.00 |" in (reports / "table8.md").read_text()
    health = (reports / "health.md").read_text()
    assert "`distill/x/seed0`" in health and "stayed_at_chance, constant_prediction" in health and "C²KD" in health
    assert "not a dataset of the paper" in (reports / "paper_comparison.md").read_text()
    for png in ("fig5_teacher_sets_av_digits.png", "fig7_unimodal_vs_mm_av_digits.png", "fig8_mm_vs_cm_av_digits.png"):
        assert (reports / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_values_print_beside_ours_with_the_difference():
    from pipeline.reporting.paper_outputs import paper_comparison_markdown

    runs = [{**r, "dataset": "av_mnist"} for r in RUNS]
    t1 = table1(runs, ["av_mnist"])
    text = paper_comparison_markdown(t1, {}, ["av_mnist"], {("av_mnist", "table1", "kd_mm", "image"): 66.5})
    assert "| table1 | KD (MM) | image | 65.00 | 66.50 | -1.50 |" in text
    assert "not transcribed" in paper_comparison_markdown(t1, {}, ["av_mnist"], {})


def test_paired_gains_subtract_the_same_seeds_wo_kd():
    from pipeline.reporting.paper_outputs import paired_markdown

    text = paired_markdown(RUNS, ["av_digits"])
    # KD (MM) image 64, 66 against w/o KD 60, 62: +4, +4; audio 42, 42 against 40, 44: +2, -2
    assert "| KD (MM) | +4.00 ± 0.00 (2/2) | +0.00 ± 2.83 (1/2) |" in text
    assert "| KD (CM) | -10.00 ± 0.00 (0/2) | – |" in text


def test_table1_prints_the_papers_value_and_the_difference_beside_ours():
    """For a dataset of the paper, a cell the paper reports shows its value and ours − paper (Markdown and CSV);
    a cell it does not report shows ours alone."""
    runs = [dict(r, dataset="crisismmd_v2", target={"image": "image", "audio": "text"}.get(r["target"], r["target"]))
            for r in RUNS]
    paper = {("crisismmd_v2", "table1", "kd_mm", "image"): 63.5, ("crisismmd_v2", "table1", "wo_kd", "text"): 40.0}
    summary = table1(runs, ["crisismmd_v2"])
    lines = table1_markdown(summary, ["crisismmd_v2"], paper).splitlines()
    assert lines[0] == "| Method | CrisisMMD-V2 Image | CrisisMMD-V2 Text |"
    assert lines[2] == "| w/o KD | <u>61.00 ± 1.41</u> | **42.00 ± 2.83** (paper 40.00; Δ +2.00) |"
    assert lines[3] == "| KD (MM) | **65.00 ± 1.41** (paper 63.50; Δ +1.50) | **42.00 ± 0.00** |"
    rows = {r["row_key"]: r for r in csv.DictReader(io.StringIO(table1_csv(summary, ["crisismmd_v2"], paper)))}
    assert float(rows["kd_mm"]["crisismmd_v2/image/paper"]) == 63.5
    assert float(rows["kd_mm"]["crisismmd_v2/image/diff"]) == pytest.approx(1.5)
    assert rows["kd_cm"]["crisismmd_v2/image/paper"] == "" and rows["kd_cm"]["crisismmd_v2/image/diff"] == ""
    untranscribed = table1_markdown(summary, ["crisismmd_v2"], {})
    assert "Not transcribed yet for CrisisMMD-V2" in untranscribed


def test_confusion_matrix_of_many_classes_is_drawn_without_per_cell_labels(tmp_path, monkeypatch):
    """VGGSound's 141 classes: a colour-only heat map (19,881 cell labels would take matplotlib ~25 s)."""
    import matplotlib.axes
    import numpy as np

    from pipeline.reporting.figures import confusion_matrix_png

    labels = []
    original = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, *a, **k: labels.append(a) or original(self, *a, **k))
    path = confusion_matrix_png(np.eye(141, dtype=np.int64), tmp_path / "c141.png", "141 classes")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and labels == []
    confusion_matrix_png(np.eye(8, dtype=np.int64), tmp_path / "c8.png", "8 classes")
    assert len(labels) == 64
