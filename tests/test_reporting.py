"""Table 1 aggregation and layout from hand-made run records."""

from __future__ import annotations

import csv
import io
import json

import pytest

from pipeline.reporting.tables import (TABLE1_ROWS, ResultsError, read_runs, table1, table1_csv, table1_markdown,
                                      table3, table3_markdown, write_reports)


def _run(method, teacher, target, seed, acc, stage="distill"):
    return {"dataset": "av_digits", "stage": stage, "method": method, "teacher": teacher, "target": target,
            "seed": seed, "test_accuracy": acc}


RUNS = ([_run("ce", "none", t, s, a, stage) for t, accs in (("m1", (0.60, 0.62)), ("m2", (0.40, 0.44)))
         for s, a in enumerate(accs) for stage in ("teachers", "wo_kd")]
        + [_run("ce", "none", "mm", s, a, "teachers") for s, a in enumerate((0.70, 0.72))]
        + [_run("kd", "mm", "m1", s, a) for s, a in enumerate((0.64, 0.66))]
        + [_run("kd", "cm", "m1", s, a) for s, a in enumerate((0.50, 0.52))]
        + [_run("kd", "mm", "m2", s, a) for s, a in enumerate((0.42, 0.42))])


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
    assert [r["method"] for r in rows] == [row.label for row in TABLE1_ROWS]
    assert rows[0]["method"] == "w/o KD" and rows[-1]["method"] == "MST-Distill (MM+CM)"
    assert float(rows[1]["av_digits/image/mean"]) == 65.0 and rows[2]["av_digits/audio/mean"] == ""


def test_write_reports_and_errors(tmp_path):
    results = tmp_path / "results" / "av_digits"
    results.mkdir(parents=True)
    (results / "all.json").write_text(json.dumps({"runs": RUNS}))
    metrics = write_reports(tmp_path / "results", tmp_path / "reports", ["av_digits"])
    assert metrics["teachers"]["av_digits"]["multimodal"]["mean"] == 71.0
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "reports" / "table1.md").read_text().startswith("| Method |")
    (results / "broken.json").write_text("{not json")
    with pytest.raises(ResultsError, match="broken.json"):
        read_runs(tmp_path / "results", ["av_digits"])
    with pytest.raises(ResultsError, match="no results"):
        read_runs(tmp_path / "results", ["av_mnist"])


def _ablation(setting, target, seed, acc):
    return {**_run(f"mst_{setting}", "mm+cm", target, seed, acc, "mst_ablation"), "setting": setting}


def test_table3_means_over_targets_and_seeds_and_marks_the_best():
    runs = ([_ablation("baseline", t, s, a) for t, s, a in (("m1", 0, .50), ("m2", 0, .30), ("m1", 1, .54),
                                                             ("m2", 1, .34))]
            + [_run("mst", "mm+cm", t, s, a, "mst_s3") for t, s, a in (("m1", 0, .60), ("m2", 0, .40),
                                                                         ("m1", 1, .64), ("m2", 1, .44))])
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
    runs = [_run("ce", "none", "m1", 0, 0.90, "teachers"), _run("ce", "none", "m1", 0, 0.60, "wo_kd")]
    assert table1(runs, ["av_digits"])["av_digits"]["image"]["wo_kd"]["mean"] == 60.0
