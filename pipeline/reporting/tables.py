"""The paper's tables and figures from the stages' results files: Table 1 (rows from the method registry),
Table 3 (rows from MST-Distill's stage settings), the teachers table, the top-k sweep (Fig. 6), the routing
figures (Fig. 4), the DVC metrics and the DVC plot data.

Cells are test accuracy of the selected checkpoint in percent, mean ± sample standard deviation over
seeds; in each column the best row is bold and the second best underlined, as in the paper. A cell with
a seed whose run health is flagged (training/health.py) carries † and a caption line saying how many.
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


def problems_of(run: dict) -> list[str]:
    """The health problems of a run record ([] when healthy or when the record predates run health)."""
    return list(run.get("health", {}).get("problems", []))


def summarise_runs(cell: list[dict]) -> dict:
    """`summarise` of the runs' test accuracy, plus `flagged`: {problem: number of seeds with it}."""
    out = summarise([r["test_accuracy"] for r in cell])
    flagged: dict[str, int] = {}
    for run in cell:
        for problem in problems_of(run):
            flagged[problem] = flagged.get(problem, 0) + 1
    if flagged:
        out["flagged"] = dict(sorted(flagged.items()))
    return out


PROBLEM_PHRASES = {"stayed_at_chance": "stayed at chance", "constant_prediction": "predicted one class",
                   "non_finite_loss": "had a non-finite training loss"}


def _flag_caption(label: str, cell: dict) -> str:
    what = "; ".join(f"{cell['flagged'][problem]} of {cell['n']} seeds {phrase}"
                     for problem, phrase in PROBLEM_PHRASES.items() if problem in cell["flagged"])
    return f"† {label}: {what}."


def flag_captions(cells: list[tuple[str, dict | None]]) -> list[str]:
    """One caption line per flagged cell, `cells` as (label, cell)."""
    lines = [_flag_caption(label, cell) for label, cell in cells if cell and cell.get("flagged")]
    if lines:
        lines = ["", *lines, "Flagged runs, with their MLflow run names: reports/health.md."]
    return lines


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
                column[row.key] = summarise_runs(cell)
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
    text = f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text
    return text + " †" if cell.get("flagged") else text


PaperValues = dict[tuple[str, str, str, str], float]   # (dataset, table, row key, target modality) -> value (%)


def _paper_note(cell: dict | None, published: float | None) -> str:
    """" (paper P; Δ ±D)" for a cell the paper reports: its value and ours − paper."""
    if published is None:
        return ""
    diff = f"; Δ {cell['mean'] - published:+.2f}" if cell else ""
    return f" (paper {published:.2f}{diff})"


def table1_markdown(summary: dict, datasets: list[str], paper: PaperValues | None = None) -> str:
    """Table 1 as Markdown; where the paper reports a cell (`paper`), its value and the difference follow ours."""
    paper = paper or {}
    columns = _columns(datasets)
    header = ["Method"] + [f"{dataset_spec(d).display_name} {m.capitalize()}" for d, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(columns)]
    marks = {c: _rank_marks(summary[c[0]][c[1]]) for c in columns}
    for row in table1_rows():
        cells = [_cell_text(summary[d][m].get(row.key), marks[(d, m)].get(row.key))
                 + _paper_note(summary[d][m].get(row.key), paper.get((d, "table1", row.key, m))) for d, m in columns]
        lines.append("| " + " | ".join([row.label, *cells]) + " |")
    n_seeds = sorted({cell["n"] for d, m in columns for cell in summary[d][m].values()})
    lines += ["", f"Test accuracy (%) of the checkpoint with the lowest validation loss, mean ± sample std over "
                  f"{'/'.join(map(str, n_seeds))} seeds. **Bold**: best; <u>underlined</u>: second best. "
                  "MM: multimodal teacher; CM: cross-modal (other-modality) teacher."]
    in_paper = [d for d in datasets if dataset_spec(d).in_paper]
    if in_paper:
        missing = [dataset_spec(d).display_name for d in in_paper if not any(k[0] == d for k in paper)]
        lines.append("(paper P; Δ D): the paper's published value and ours − paper."
                     + (f" Not transcribed yet for {', '.join(missing)} (pipeline/reporting/paper_values.csv)."
                        if missing else ""))
    lines += flag_captions([(f"{row.label}, {dataset_spec(d).display_name} {m}", summary[d][m].get(row.key))
                            for row in table1_rows() for d, m in columns])
    return "\n".join(lines) + "\n"


def table1_csv(summary: dict, datasets: list[str], paper: PaperValues | None = None) -> str:
    """Table 1 as CSV: mean, std, n per column, and for the paper's datasets the paper's value and ours − paper."""
    paper = paper or {}
    columns = _columns(datasets)
    stats = {c: ("mean", "std", "n", "paper", "diff") if dataset_spec(c[0]).in_paper else ("mean", "std", "n")
             for c in columns}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "row_key"] + [f"{d}/{m}/{s}" for d, m in columns for s in stats[(d, m)]])
    for row in table1_rows():
        values = []
        for d, m in columns:
            cell = summary[d][m].get(row.key)
            values += [cell["mean"], cell["std"], cell["n"]] if cell else ["", "", ""]
            if len(stats[(d, m)]) == 5:
                published = paper.get((d, "table1", row.key, m))
                values += ["" if published is None else published,
                           "" if published is None or not cell else round(cell["mean"] - published, 4)]
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
            row = {m: summarise_runs([r for r in cell_runs if r["target"] == m])
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
    lines += flag_captions([(f"{setting.label}, {dataset_spec(d).display_name} {m}",
                             summary.get(d, {}).get(key, {}).get(m))
                            for key, setting in STAGE_SETTINGS.items() for d, m in _columns(datasets)])
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
    stacked = _nan_padded([r["extras"]["routing"] for r in cell])  # each epoch: the runs still training
    return np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0), list(cell[0]["extras"]["specialists"])


def learning_curves(runs: list[dict], dataset: str, modality: str) -> tuple[list[str], np.ndarray] | None:
    """Seed-mean validation accuracy (%) per epoch of every Table 1 row of one target: (row keys, epochs × rows)."""
    keys, curves = [], []
    for row in table1_rows():
        cell = [r for r in runs if r["dataset"] == dataset and r["target"] == modality and row.matches(r)
                and r.get("curve")]
        if not cell:
            continue
        keys.append(row.key)
        curves.append(np.nanmean(_nan_padded([[100.0 * e["val_accuracy"] for e in r["curve"]] for r in cell]), axis=0))
    if not keys:
        return None
    return keys, _nan_padded(curves).T


def _nan_padded(series: list) -> np.ndarray:
    """Per-epoch series of different lengths (early stopping ends runs at different epochs) stacked into one
    array (series × epochs × ...), NaN after each series' end; nanmean over axis 0 then averages, per epoch,
    the runs still training."""
    arrays = [np.asarray(s, dtype=np.float64) for s in series]
    out = np.full((len(arrays), max(len(a) for a in arrays), *arrays[0].shape[1:]), np.nan)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return out


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
