"""The paper's tables and figures from the stages' results files: Table 1 (rows from the method registry),
Table 3 (rows from MST-Distill's stage settings), the teachers table, the top-k sweep (Fig. 6), the routing
figures (Fig. 4), the DVC metrics and the DVC plot data.

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
from pipeline.errors import UserError
from pipeline.methods import table_rows
from pipeline.methods.mst.settings import STAGE_SETTINGS
from pipeline.models.registry import DISPLAY_NAMES

TARGETS = ("m1", "m2")


@dataclass(frozen=True)
class Row:
    key: str         # metrics key
    label: str       # as printed in the table
    method: str
    teacher: str     # "none", "mm", "cm", "mm+cm"

    def matches(self, run: dict) -> bool:
        """Whether a run record is one of this row's cells: the w/o KD row takes the unimodal networks trained at
        the students' settings; MST-Distill its phase-3 runs; every other row its distill-stage runs."""
        if self.method == "ce":
            return run["method"] == "ce" and run["setting"] == "wo_kd"
        stage = "mst_s3" if self.method == "mst" else "distill"
        return run["stage"] == stage and run["method"] == self.method and run["teacher"] == self.teacher


def table1_rows() -> list[Row]:
    """The paper's Table 1 rows, in its order, from the registry."""
    return [Row(*row) for row in table_rows()]


class ResultsError(UserError):
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


def _columns(datasets: list[str]) -> list[tuple[str, str]]:
    return [(d, dataset_spec(d).modalities[t]) for d in datasets for t in TARGETS]


def table1(runs: list[dict], datasets: list[str]) -> dict:
    """{dataset: {target modality: {row key: {mean, std, n}}}} for the rows that have runs."""
    out: dict = {}
    for dataset, modality in _columns(datasets):
        column = out.setdefault(dataset, {}).setdefault(modality, {})
        for row in table1_rows():
            cell = sorted((r for r in runs if r["dataset"] == dataset and r["target"] == modality and row.matches(r)),
                          key=lambda r: r["seed"])
            if cell:
                column[row.key] = summarise([r["test_accuracy"] for r in cell])
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


def _cell_text(cell: dict | None, mark: str | None) -> str:
    if cell is None:
        return "–"
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    return f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text


def table1_markdown(summary: dict, datasets: list[str]) -> str:
    columns = _columns(datasets)
    header = ["Method"] + [f"{dataset_spec(d).display_name} {m.capitalize()}" for d, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(columns)]
    marks = {c: _rank_marks(summary[c[0]][c[1]]) for c in columns}
    for row in table1_rows():
        cells = [_cell_text(summary[d][m].get(row.key), marks[(d, m)].get(row.key)) for d, m in columns]
        lines.append("| " + " | ".join([row.label, *cells]) + " |")
    n_seeds = sorted({cell["n"] for d, m in columns for cell in summary[d][m].values()})
    lines += ["", f"Test accuracy (%) of the checkpoint with the lowest validation loss, mean ± sample std over "
                  f"{'/'.join(map(str, n_seeds))} seeds. **Bold**: best; <u>underlined</u>: second best. "
                  "MM: multimodal teacher; CM: cross-modal (other-modality) teacher."]
    return "\n".join(lines) + "\n"


def table1_csv(summary: dict, datasets: list[str]) -> str:
    columns = _columns(datasets)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "row_key"] + [f"{d}/{m}/{s}" for d, m in columns for s in ("mean", "std", "n")])
    for row in table1_rows():
        values = []
        for d, m in columns:
            cell = summary[d][m].get(row.key)
            values += [cell["mean"], cell["std"], cell["n"]] if cell else ["", "", ""]
        writer.writerow([row.label, row.key] + values)
    return buffer.getvalue()


def teachers_summary(runs: list[dict], datasets: list[str]) -> dict:
    """Accuracy of each network trained alone: {dataset: {"multimodal"|modality: {mean, std, n, network}}}."""
    out: dict = {}
    for dataset in datasets:
        spec = dataset_spec(dataset)
        for role in ("mm", "m1", "m2"):
            name = spec.modality_name(role)
            cell = [r for r in runs if r["dataset"] == dataset and r["stage"] == "teachers"
                    and r["setting"] == "teacher" and r["target"] == name]
            if cell:
                out.setdefault(dataset, {})[name] = {**summarise([r["test_accuracy"] for r in cell]),
                                                     "network": spec.networks[role]}
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


def _setting_runs(runs: list[dict], dataset: str, setting: str) -> list[dict]:
    stage = "mst_s3" if setting == "full" else "mst_ablation"
    return [r for r in runs if r["dataset"] == dataset and r["stage"] == stage and r["method"] == "mst"
            and r["setting"] == setting]


def table3(runs: list[dict], datasets: list[str]) -> dict:
    """{dataset: {setting: {modality: {mean, std, n}, "mean": {mean, std, n}}}}. The "mean" cell averages
    both targets per seed, then summarises over seeds."""
    out: dict = {}
    for dataset in datasets:
        spec = dataset_spec(dataset)
        for key in STAGE_SETTINGS:
            cell_runs = _setting_runs(runs, dataset, key)
            if not cell_runs:
                continue
            names = [spec.modalities[t] for t in TARGETS]
            row = {m: summarise([r["test_accuracy"] for r in cell_runs if r["target"] == m])
                   for m in names if any(r["target"] == m for r in cell_runs)}
            seeds = sorted({r["seed"] for r in cell_runs})
            per_seed = [float(np.mean([r["test_accuracy"] for r in cell_runs if r["seed"] == s])) for s in seeds]
            row["mean"] = summarise(per_seed)
            out.setdefault(dataset, {})[key] = row
    return out


def table3_markdown(summary: dict, datasets: list[str]) -> str:
    columns = _columns(datasets) + [(d, "mean") for d in datasets]
    header = ["Setting", "S1", "S2", "S3"] + [f"{dataset_spec(d).display_name} {m.capitalize()}" for d, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|---|:-:|:-:|:-:|" + "---:|" * len(columns)]
    marks = {c: _rank_marks({k: v[c[1]] for k, v in summary.get(c[0], {}).items() if c[1] in v}) for c in columns}
    for key, setting in STAGE_SETTINGS.items():
        cells = [setting.label] + ["✓" if on else "✗" for on in setting[1:]]
        cells += [_cell_text(summary.get(d, {}).get(key, {}).get(m), marks[(d, m)].get(key)) for d, m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "MST-Distill stage ablation (paper Table 3): test accuracy (%), mean ± sample std over seeds; the "
                  "Mean column averages both targets per seed. S1: collaborative initialisation (off: teachers "
                  "trained independently, the student starts from scratch). S2: specialised MaskNet teachers (off: "
                  "the plain multimodal and cross-modal teachers). S3: GateNet top-k routing (off: the teachers' "
                  "distillation signals averaged). **Bold**: best; <u>underlined</u>: second best."]
    return "\n".join(lines) + "\n"


def table3_csv(summary: dict, datasets: list[str]) -> str:
    columns = _columns(datasets) + [(d, "mean") for d in datasets]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["setting", "S1", "S2", "S3"] + [f"{d}/{m}/{s}" for d, m in columns for s in ("mean", "std", "n")])
    for key, setting in STAGE_SETTINGS.items():
        values = []
        for d, m in columns:
            cell = summary.get(d, {}).get(key, {}).get(m)
            values += [cell["mean"], cell["std"], cell["n"]] if cell else ["", "", ""]
        writer.writerow([key] + [int(on) for on in setting[1:]] + values)
    return buffer.getvalue()


def topk_summary(runs: list[dict], dataset: str) -> dict:
    """{modality: {k: {mean, std, n}}} of the top-k sweep's runs (paper Fig. 6)."""
    spec = dataset_spec(dataset)
    sweep = [r for r in runs if r["dataset"] == dataset and r["stage"] == "mst_topk_sweep"]
    ks = sorted({r["extras"]["topk"] for r in sweep})
    return {spec.modalities[t]: {k: summarise([r["test_accuracy"] for r in sweep if r["extras"]["topk"] == k
                                               and r["target"] == spec.modalities[t]]) for k in ks}
            for t in TARGETS} if sweep else {}


def topk_markdown(summary: dict, dataset: str) -> str:
    spec = dataset_spec(dataset)
    modalities = list(summary)
    lines = ["| k | " + " | ".join(f"{spec.display_name} {m.capitalize()}" for m in modalities) + " |",
             "|---:|" + "---:|" * len(modalities)]
    for k in summary[modalities[0]]:
        lines.append(f"| {k} | " + " | ".join(_cell_text(summary[m][k], None) for m in modalities) + " |")
    lines += ["", "MST-Distill phase 3 with top-k routing (paper Fig. 6): test accuracy (%), mean ± sample std over "
                  "seeds; the collaborative-initialisation networks and MaskNets are shared by every k."]
    return "\n".join(lines) + "\n"


def routing_summary(runs: list[dict], dataset: str, modality: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Seed mean and std of the per-epoch routing fractions (epochs × N) of the phase-3 runs of one target."""
    cell = [r for r in runs if r["dataset"] == dataset and r["stage"] == "mst_s3" and r["target"] == modality
            and r["extras"].get("routing")]
    if not cell:
        return None
    stacked = np.array([r["extras"]["routing"] for r in cell], dtype=np.float64)
    return stacked.mean(axis=0), stacked.std(axis=0), list(cell[0]["extras"]["specialists"])


def learning_curves(runs: list[dict], dataset: str, modality: str) -> tuple[list[str], np.ndarray] | None:
    """Seed-mean validation accuracy (%) per epoch of every Table 1 row of one target: (row keys, epochs × rows)."""
    keys, curves = [], []
    for row in table1_rows():
        cell = [r for r in runs if r["dataset"] == dataset and r["target"] == modality and row.matches(r)
                and r.get("curve")]
        if not cell or len({len(r["curve"]) for r in cell}) != 1:
            continue
        keys.append(row.key)
        curves.append(np.mean([[100.0 * e["val_accuracy"] for e in r["curve"]] for r in cell], axis=0))
    if not keys or len({len(c) for c in curves}) != 1:
        return None
    return keys, np.stack(curves, axis=1)


def metrics_summary(t1: dict, t3: dict) -> dict:
    """The DVC metrics, few enough for `dvc metrics show` to fit a screen: per dataset and target, the seed
    means of w/o KD, the best baseline and MST-Distill (Table 1), and the Table 3 Mean of the baseline and
    of the full method. Every cell, with std and n, is in reports/table1.csv and table3.csv."""
    out: dict = {}
    for dataset, by_target in t1.items():
        for modality, column in by_target.items():
            baselines = [c["mean"] for key, c in column.items() if key not in ("wo_kd", "mst")]
            cells = {"wo_kd": column.get("wo_kd", {}).get("mean"), "best_baseline": max(baselines, default=None),
                     "mst": column.get("mst", {}).get("mean")}
            out.setdefault(dataset, {})[modality] = {k: v for k, v in cells.items() if v is not None}
    for dataset, settings in t3.items():
        cells = {k: settings[k]["mean"]["mean"] for k in ("baseline", "full") if k in settings}
        out.setdefault(dataset, {})["table3_mean"] = cells
    return out


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_reports(results_dir: Path, out_dir: Path, datasets: list[str]) -> dict:
    """Write Table 1 and Table 3 (.md, .csv), teachers.md, the top-k sweep (.md), metrics.json, the
    figures (figures/*.png) and the DVC plot data (plots/*.csv) under `out_dir`; return the metrics. Every
    text is computed before anything is written."""
    from pipeline.reporting.figures import routing_curves_png, topk_sweep_png

    runs = read_runs(results_dir, datasets)
    t1, t3, teachers = table1(runs, datasets), table3(runs, datasets), teachers_summary(runs, datasets)
    metrics = metrics_summary(t1, t3)
    outputs = {"table1.md": table1_markdown(t1, datasets), "table1.csv": table1_csv(t1, datasets),
               "table3.md": table3_markdown(t3, datasets), "table3.csv": table3_csv(t3, datasets),
               "teachers.md": teachers_markdown(teachers),
               "metrics.json": json.dumps(metrics, indent=2, sort_keys=True) + "\n"}
    figures = []
    sweeps = []
    for dataset in datasets:
        spec = dataset_spec(dataset)
        sweep = topk_summary(runs, dataset)
        if sweep:
            sweeps.append(topk_markdown(sweep, dataset))
            ks = list(next(iter(sweep.values())))
            outputs[f"plots/topk_{dataset}.csv"] = _csv_text(
                ["k", *[f"{m}_mean" for m in sweep], *[f"{m}_std" for m in sweep]],
                [[k, *[sweep[m][k]["mean"] for m in sweep], *[sweep[m][k]["std"] for m in sweep]] for k in ks])
            figures.append(lambda d=dataset, s=sweep, ks=ks: topk_sweep_png(
                ks, {m: [s[m][k]["mean"] for k in ks] for m in s}, {m: [s[m][k]["std"] for k in ks] for m in s},
                out_dir / "figures" / f"topk_sweep_{d}.png", f"{dataset_spec(d).display_name}: MST-Distill top-k sweep"))
        for target in TARGETS:
            modality = spec.modalities[target]
            routing = routing_summary(runs, dataset, modality)
            if routing is not None:
                mean, std, labels = routing
                outputs[f"plots/routing_{dataset}_{modality}.csv"] = _csv_text(
                    ["epoch", *labels], [[e + 1, *map(float, row)] for e, row in enumerate(mean)])
                n = len({r["seed"] for r in runs if r["stage"] == "mst_s3" and r["dataset"] == dataset})
                figures.append(lambda m=mean, s=std, lab=labels, mod=modality, n=n, spec=spec: routing_curves_png(
                    m, lab, out_dir / "figures" / f"routing_{spec.key}_{mod}.png",
                    f"{spec.display_name}, {mod} student: share of top-k picks\n"
                    f"per specialised teacher (mean ± std over {n} seeds)", spread=s))
            curves = learning_curves(runs, dataset, modality)
            if curves is not None:
                keys, values = curves
                outputs[f"plots/learning_curves_{dataset}_{modality}.csv"] = _csv_text(
                    ["epoch", *keys], [[e + 1, *[round(float(v), 4) for v in row]] for e, row in enumerate(values)])
    outputs["topk_sweep.md"] = "\n".join(sweeps) if sweeps else "No top-k sweep results.\n"
    for name, text in outputs.items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    for draw in figures:
        draw()
    return metrics
