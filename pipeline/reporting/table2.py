"""The paper's Table 2: semantic segmentation (NYU-Depth-V2, or the embedded RGB-D Digits) with RGB and
depth students, OA / AA / mIoU per student, from the stages' results files.

Rows are the Table 1 rows of the methods that run on segmentation (the paper's Table 2 rows: w/o KD, KD,
FitNets, DML, MGDFR, C²KD, MST-Distill). A cell is the metric of the checkpoint with the lowest validation
loss on the test split, computed as the authors' `model_metrics` (void ignored, pixels predicted as void
dropped, each value rounded to 4 decimals), in percent, mean ± sample std over seeds.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from pipeline.data.catalog import dataset_spec
from pipeline.methods import method_class
from pipeline.reporting.tables import TARGETS, Row, flag_captions, table1_rows

METRICS = (("oa", "OA"), ("aa", "AA"), ("miou", "mIoU"))


def table2_rows() -> list[Row]:
    """Table 1's rows whose method runs on segmentation, in the paper's order."""
    return [row for row in table1_rows() if method_class(row.method).segmentation]


def _columns(datasets: list[str]) -> list[tuple[str, str, str]]:
    return [(d, dataset_spec(d).modalities[t], metric) for d in datasets for t in TARGETS for metric, _ in METRICS]


def _summary(values: list[float]) -> dict:
    array = 100.0 * np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": round(float(array.mean()), 4), "std": round(std, 4), "n": len(array)}


def table2(runs: list[dict], datasets: list[str]) -> dict:
    """{dataset: {modality: {metric: {row key: {mean, std, n[, flagged]}}}}} for the rows that have runs."""
    out: dict = {}
    for dataset, modality, metric in _columns(datasets):
        column = out.setdefault(dataset, {}).setdefault(modality, {}).setdefault(metric, {})
        for row in table2_rows():
            cell = sorted((r for r in runs if r["dataset"] == dataset and r["target"] == modality and row.matches(r)),
                          key=lambda r: r["seed"])
            if not cell:
                continue
            missing = [r["run_name"] for r in cell if metric not in r.get("test_metrics", {})]
            if missing:
                raise ValueError(f"results of {missing[0]} hold no test_metrics.{metric}; re-run its stage")
            column[row.key] = _summary([r["test_metrics"][metric] for r in cell])
            flagged: dict[str, int] = {}
            for run in cell:
                for problem in run.get("health", {}).get("problems", []):
                    flagged[problem] = flagged.get(problem, 0) + 1
            if flagged:
                column[row.key]["flagged"] = dict(sorted(flagged.items()))
    return out


def _best(column: dict) -> tuple[float | None, float | None]:
    means = sorted({cell["mean"] for cell in column.values()}, reverse=True)
    return (means[0] if means else None), (means[1] if len(means) > 1 else None)


def _cell_text(cell: dict | None, best: tuple[float | None, float | None]) -> str:
    if cell is None:
        return "–"
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    if cell["mean"] == best[0]:
        text = f"**{text}**"
    elif cell["mean"] == best[1]:
        text = f"<u>{text}</u>"
    return text + " †" if cell.get("flagged") else text


def table2_markdown(summary: dict, datasets: list[str]) -> str:
    """Table 2 as Markdown: one block per segmentation dataset, columns RGB and Depth × OA, AA, mIoU."""
    if not datasets:
        return ("No segmentation dataset is enabled (params.yaml `segmentation.datasets`), so there is no "
                "Table 2.\n")
    lines = []
    for dataset in datasets:
        spec = dataset_spec(dataset)
        columns = _columns([dataset])
        header = ["Method"] + [f"{m.upper() if m == 'rgb' else m.capitalize()} {label}"
                               for _, m, metric in columns for key, label in METRICS if key == metric]
        lines += [f"### {spec.display_name}", "", "| " + " | ".join(header) + " |",
                  "|---|" + "---:|" * len(columns)]
        best = {c: _best(summary[c[0]][c[1]][c[2]]) for c in columns}
        for row in table2_rows():
            cells = [_cell_text(summary[d][m][metric].get(row.key), best[(d, m, metric)]) for d, m, metric in columns]
            lines.append("| " + " | ".join([row.label, *cells]) + " |")
        n_seeds = sorted({cell["n"] for d, m, metric in columns for cell in summary[d][m][metric].values()})
        lines += ["", f"Test OA, AA and mIoU (%) of the checkpoint with the lowest validation loss, computed as the "
                      f"authors' `model_metrics` (void ignored, pixels predicted as void dropped), mean ± sample "
                      f"std over {'/'.join(map(str, n_seeds)) or 0} seeds. **Bold**: best; <u>underlined</u>: second "
                      f"best (per column). MM: multimodal teacher (FuseNet-I); CM: cross-modal teacher (the other "
                      f"modality's branch). MLLD, OFA, RKD and CRD have no Table 2 row (the paper could not apply "
                      f"them to segmentation)."]
        if not spec.in_paper:
            lines.append(f"{spec.display_name} is the embedded stand-in, not a paper dataset: no published values "
                         "to compare.")
        # one caption per (row, student): a run's health does not depend on the metric
        lines += flag_captions([(f"{row.label}, {spec.display_name} {m.upper() if m == 'rgb' else m} student",
                                 summary[d][m][metric].get(row.key))
                                for row in table2_rows() for d, m, metric in columns if metric == "miou"])
        lines.append("")
    return "\n".join(lines)


def table2_csv(summary: dict, datasets: list[str]) -> str:
    """Table 2 as CSV: mean, std, n per (dataset, modality, metric) column."""
    columns = _columns(datasets)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "row_key"] + [f"{d}/{m}/{metric}/{s}" for d, m, metric in columns
                                             for s in ("mean", "std", "n")])
    for row in table2_rows():
        values = []
        for d, m, metric in columns:
            cell = summary[d][m][metric].get(row.key)
            values += [cell["mean"], cell["std"], cell["n"]] if cell else ["", "", ""]
        writer.writerow([row.label, row.key] + values)
    return buffer.getvalue()


def table2_metrics(summary: dict) -> dict:
    """DVC metrics of Table 2, as Table 1's: per dataset and student modality, the mIoU seed means of w/o KD,
    the best baseline and MST-Distill (every cell is in reports/table2.csv)."""
    out: dict = {}
    for dataset, by_modality in summary.items():
        for modality, by_metric in by_modality.items():
            column = by_metric.get("miou", {})
            baselines = [c["mean"] for key, c in column.items() if key not in ("wo_kd", "mst")]
            cells = {"miou_wo_kd": column.get("wo_kd", {}).get("mean"), "miou_best_baseline": max(baselines, default=None),
                     "miou_mst": column.get("mst", {}).get("mean")}
            out.setdefault(dataset, {})[modality] = {k: v for k, v in cells.items() if v is not None}
    return out
