"""Table 1 (and the teachers table) from the stages' results files, as Markdown, CSV and DVC metrics.

Cells are test accuracy of the selected checkpoint in percent, mean ± sample standard deviation over
seeds; in each column the best row is bold and the second best underlined, as in the paper.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.catalog import dataset_spec
from pipeline.models.registry import DISPLAY_NAMES


@dataclass(frozen=True)
class Row:
    label: str       # as printed in the table
    key: str         # metrics key
    method: str
    teacher: str     # "none", "mm", "cm", "mm+cm"
    stage: str | None = None  # only runs of this stage (w/o KD: not the teachers' own runs)


# The paper's Table 1 rows, in its order; later methods add rows here.
TABLE1_ROWS = (
    Row("w/o KD", "wo_kd", "ce", "none", stage="wo_kd"),
    Row("KD (MM)", "kd_mm", "kd", "mm"),
    Row("KD (CM)", "kd_cm", "kd", "cm"),
    Row("MLLD (MM)", "mlld_mm", "mlld", "mm"),
    Row("MLLD (CM)", "mlld_cm", "mlld", "cm"),
    Row("FitNets (MM)", "fitnets_mm", "fitnets", "mm"),
    Row("FitNets (CM)", "fitnets_cm", "fitnets", "cm"),
    Row("OFA (MM)", "ofa_mm", "ofa", "mm"),
    Row("OFA (CM)", "ofa_cm", "ofa", "cm"),
    Row("RKD (MM)", "rkd_mm", "rkd", "mm"),
    Row("RKD (CM)", "rkd_cm", "rkd", "cm"),
    Row("CRD (MM)", "crd_mm", "crd", "mm"),
    Row("CRD (CM)", "crd_cm", "crd", "cm"),
    Row("DML (MM+CM)", "dml", "dml", "mm+cm"),
    Row("MGDFR (CM)", "mgdfr_cm", "mgdfr", "cm"),
    Row("C²KD (CM)", "c2kd_cm", "c2kd", "cm"),
    Row("MST-Distill (MM+CM)", "mst", "mst", "mm+cm"),
)
TARGETS = ("m1", "m2")


class ResultsError(ValueError):
    """A results file is missing or malformed."""


def read_runs(results_dir: Path, datasets: list[str]) -> list[dict]:
    """Every run record of the enabled datasets (results/<dataset>/*.json)."""
    runs = []
    for key in datasets:
        folder = results_dir / key
        files = sorted(folder.glob("*.json"))
        if not files:
            raise ResultsError(f"{folder}: no results files; run the pipeline (dvc repro) first")
        for path in files:
            try:
                payload = json.loads(path.read_text())
                runs.extend(payload["runs"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ResultsError(f"{path}: expected JSON with a 'runs' list: {err}") from err
    return runs


def summarise(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single seed) in percent."""
    array = 100.0 * np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": round(float(array.mean()), 4), "std": round(std, 4), "n": len(array)}


def _cell_runs(runs: list[dict], dataset: str, row: Row, target: str) -> list[dict]:
    return [r for r in runs if r["dataset"] == dataset and r["method"] == row.method
            and r["teacher"] == row.teacher and r["target"] == target and row.stage in (None, r["stage"])]


def table1(runs: list[dict], datasets: list[str]) -> dict:
    """{dataset: {target modality: {row key: {mean, std, n}}}} for the rows that have runs."""
    out: dict = {}
    for dataset in datasets:
        spec = dataset_spec(dataset)
        for target in TARGETS:
            column = out.setdefault(dataset, {}).setdefault(spec.modalities[target], {})
            for row in TABLE1_ROWS:
                cell = _cell_runs(runs, dataset, row, target)
                if cell:
                    column[row.key] = summarise([r["test_accuracy"] for r in sorted(cell, key=lambda r: r["seed"])])
    return out


def _rank_marks(column: dict) -> dict[str, str]:
    """Row key -> "best" / "second" by mean accuracy (ties share the mark)."""
    means = sorted({cell["mean"] for cell in column.values()}, reverse=True)
    marks = {}
    for key, cell in column.items():
        if cell["mean"] == means[0]:
            marks[key] = "best"
        elif len(means) > 1 and cell["mean"] == means[1]:
            marks[key] = "second"
    return marks


def table1_markdown(summary: dict, datasets: list[str]) -> str:
    columns = [(d, dataset_spec(d).modalities[t]) for d in datasets for t in TARGETS]
    header = ["Method"] + [f"{dataset_spec(d).display_name} {m.capitalize()}" for d, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(columns)]
    marks = {c: _rank_marks(summary[c[0]][c[1]]) for c in columns}
    for row in TABLE1_ROWS:
        cells = [row.label]
        for d, m in columns:
            cell = summary[d][m].get(row.key)
            if cell is None:
                cells.append("–")
                continue
            text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
            mark = marks[(d, m)].get(row.key)
            cells.append(f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text)
        lines.append("| " + " | ".join(cells) + " |")
    n_seeds = sorted({cell["n"] for d, m in columns for cell in summary[d][m].values()})
    lines += ["", f"Test accuracy (%) of the checkpoint with the lowest validation loss, mean ± sample std over "
                  f"{'/'.join(map(str, n_seeds))} seeds. **Bold**: best; <u>underlined</u>: second best. "
                  "MM: multimodal teacher; CM: cross-modal (other-modality) teacher."]
    return "\n".join(lines) + "\n"


def table1_csv(summary: dict, datasets: list[str]) -> str:
    columns = [(d, dataset_spec(d).modalities[t]) for d in datasets for t in TARGETS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "row_key"] + [f"{d}/{m}/{s}" for d, m in columns for s in ("mean", "std", "n")])
    for row in TABLE1_ROWS:
        values = []
        for d, m in columns:
            cell = summary[d][m].get(row.key)
            values += [cell["mean"], cell["std"], cell["n"]] if cell else ["", "", ""]
        writer.writerow([row.label, row.key] + values)
    return buffer.getvalue()


def teachers_summary(runs: list[dict], datasets: list[str]) -> dict:
    """Accuracy of each network trained alone: {dataset: {"multimodal"|modality: {mean, std, n, arch}}}."""
    out: dict = {}
    for dataset in datasets:
        spec = dataset_spec(dataset)
        for role in ("mm", "m1", "m2"):
            cell = [r for r in runs if r["dataset"] == dataset and r["stage"] == "teachers" and r["target"] == role]
            if cell:
                out.setdefault(dataset, {})[spec.modality_name(role)] = {
                    **summarise([r["test_accuracy"] for r in cell]), "network": spec.networks[role]}
    return out


def teachers_markdown(summary: dict) -> str:
    lines = ["| Dataset | Network | Input | Test accuracy (%) |", "|---|---|---|---:|"]
    for dataset, roles in summary.items():
        for role, cell in roles.items():
            lines.append(f"| {dataset_spec(dataset).display_name} | {DISPLAY_NAMES[cell['network']]} | {role} | "
                         f"{cell['mean']:.2f} ± {cell['std']:.2f} |")
    lines += ["", "Each network trained alone with cross-entropy at the teachers' settings (`teacher_training`), mean ± "
                  "sample std over seeds: the multimodal (MM) and cross-modal (CM) teachers. The \"w/o KD\" rows of "
                  "Table 1 are the unimodal networks at the students' settings (`training`); where both settings "
                  "agree they are the same runs."]
    return "\n".join(lines) + "\n"


# Paper Table 3 rows: (key, label, S1, S2, S3); "full" is the MST-Distill stage-3 run itself.
TABLE3_ROWS = (
    ("baseline", "Baseline", False, False, False),
    ("a", "(a)", True, False, False),
    ("b", "(b)", False, True, False),
    ("c", "(c)", False, False, True),
    ("d", "(d)", True, True, False),
    ("e", "(e)", True, False, True),
    ("f", "(f)", False, True, True),
    ("full", "MST-Distill", True, True, True),
)


def _setting_runs(runs: list[dict], dataset: str, setting: str) -> list[dict]:
    if setting == "full":
        return [r for r in runs if r["dataset"] == dataset and r["stage"] == "mst_s3"]
    return [r for r in runs if r["dataset"] == dataset and r["stage"] == "mst_ablation" and r.get("setting") == setting]


def table3(runs: list[dict], datasets: list[str]) -> dict:
    """{dataset: {setting: {modality: {mean, std, n}, "mean": {mean, std, n}}}}. The "mean" cell averages
    both targets per seed, then summarises over seeds."""
    out: dict = {}
    for dataset in datasets:
        spec = dataset_spec(dataset)
        for key, *_ in TABLE3_ROWS:
            cell_runs = _setting_runs(runs, dataset, key)
            if not cell_runs:
                continue
            row = {spec.modalities[t]: summarise([r["test_accuracy"] for r in cell_runs if r["target"] == t])
                   for t in TARGETS if any(r["target"] == t for r in cell_runs)}
            seeds = sorted({r["seed"] for r in cell_runs})
            per_seed = [float(np.mean([r["test_accuracy"] for r in cell_runs if r["seed"] == s])) for s in seeds]
            row["mean"] = summarise(per_seed)
            out.setdefault(dataset, {})[key] = row
    return out


def table3_markdown(summary: dict, datasets: list[str]) -> str:
    columns = [(d, dataset_spec(d).modalities[t]) for d in datasets for t in TARGETS] + [(d, "mean") for d in datasets]
    header = ["Setting", "S1", "S2", "S3"] + [f"{dataset_spec(d).display_name} {m.capitalize()}" for d, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|---|:-:|:-:|:-:|" + "---:|" * len(columns)]
    marks = {c: _rank_marks({k: v[c[1]] for k, v in summary.get(c[0], {}).items() if c[1] in v}) for c in columns}
    for key, label, *stages in TABLE3_ROWS:
        cells = [label] + ["✓" if on else "✗" for on in stages]
        for d, m in columns:
            cell = summary.get(d, {}).get(key, {}).get(m)
            if cell is None:
                cells.append("–")
                continue
            text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
            mark = marks[(d, m)].get(key)
            cells.append(f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "MST-Distill stage ablation (paper Table 3): test accuracy (%), mean ± sample std over seeds; the "
                  "Mean column averages both targets per seed. S1: collaborative initialisation (off: teachers "
                  "trained independently, the student starts from scratch). S2: specialised MaskNet teachers (off: "
                  "the plain multimodal and cross-modal teachers). S3: GateNet top-k routing (off: the teachers' "
                  "distillation signals averaged). **Bold**: best; <u>underlined</u>: second best."]
    return "\n".join(lines) + "\n"


def table3_csv(summary: dict, datasets: list[str]) -> str:
    columns = [(d, dataset_spec(d).modalities[t]) for d in datasets for t in TARGETS] + [(d, "mean") for d in datasets]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["setting", "S1", "S2", "S3"] + [f"{d}/{m}/{s}" for d, m in columns for s in ("mean", "std", "n")])
    for key, _, *stages in TABLE3_ROWS:
        values = []
        for d, m in columns:
            cell = summary.get(d, {}).get(key, {}).get(m)
            values += [cell["mean"], cell["std"], cell["n"]] if cell else ["", "", ""]
        writer.writerow([key] + [int(on) for on in stages] + values)
    return buffer.getvalue()


def routing_summary(runs: list[dict], dataset: str, target: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Seed mean and std of the per-epoch routing fractions (epochs × N) of the stage-3 runs of one target."""
    cell = [r for r in runs if r["dataset"] == dataset and r["stage"] == "mst_s3" and r["target"] == target
            and r.get("routing")]
    if not cell:
        return None
    stacked = np.array([r["routing"] for r in cell], dtype=np.float64)
    return stacked.mean(axis=0), stacked.std(axis=0), list(cell[0]["ways"])


def write_reports(results_dir: Path, out_dir: Path, datasets: list[str]) -> dict:
    """Write Table 1 and Table 3 (.md, .csv), teachers.md, metrics.json and the routing figures
    (figures/routing_<dataset>_<modality>.png) under `out_dir`; return the metrics."""
    from pipeline.reporting.figures import routing_curves_png

    runs = read_runs(results_dir, datasets)
    t1 = table1(runs, datasets)
    t3 = table3(runs, datasets)
    teachers = teachers_summary(runs, datasets)
    metrics = {"table1": t1, "table3": t3, "teachers": teachers}
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"table1.md": table1_markdown(t1, datasets), "table1.csv": table1_csv(t1, datasets),
               "table3.md": table3_markdown(t3, datasets), "table3.csv": table3_csv(t3, datasets),
               "teachers.md": teachers_markdown(teachers),
               "metrics.json": json.dumps(metrics, indent=2, sort_keys=True) + "\n"}
    for name, text in outputs.items():  # everything is computed before anything is written
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)
    for dataset in datasets:
        spec = dataset_spec(dataset)
        for target in TARGETS:
            routing = routing_summary(runs, dataset, target)
            if routing is None:
                continue
            mean, std, labels = routing
            n = len({r["seed"] for r in runs if r["stage"] == "mst_s3" and r["dataset"] == dataset})
            routing_curves_png(mean, labels, out_dir / "figures" / f"routing_{dataset}_{spec.modalities[target]}.png",
                               f"{spec.display_name}, {spec.modalities[target]} student: share of top-k picks\n"
                               f"per specialised teacher (mean ± std over {n} seeds)", spread=std)
    return metrics
