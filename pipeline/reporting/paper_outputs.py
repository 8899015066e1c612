"""The paper's outputs beyond Tables 1 and 3, from the same results files: Table 6 (training cost), Table 7
(stage 1 joint vs DML-style detached), Table 8 (KL vs CV load balancing), Fig. 5 (teacher sets), Fig. 7
(multimodal vs unimodal networks), Fig. 8 (MM vs CM teacher under KD); the run health report; and the
paper's published values beside ours where the paper has the dataset.

Accuracy cells are test accuracy (%) of the selected checkpoint, mean ± sample std over seeds, as in
tables.py. Cost cells come from each run's `cost` (wall time of its training and the growth of its peak
memory), measured where the run ran: runs of one stage share the machine with `workers` processes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.data.catalog import dataset_spec
from pipeline.methods.mst.settings import DEFAULT_VARIANT_LABELS, MST_VARIANTS, STAGE_SETTINGS
from pipeline.reporting.tables import (TARGETS, _cell_text, flag_captions, problems_of, summarise, summarise_runs,
                                       table1_rows)

PAPER_VALUES = Path(__file__).with_name("paper_values.csv")


def _by_run(runs: list[dict]) -> list[dict]:
    """One record per MLflow run (MST-Distill's phase 1 writes one record per network, with one cost)."""
    seen, out = set(), []
    for r in runs:
        key = r.get("run_name") or id(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _mean_std(values: list[float], signed: bool = False) -> str:
    """"mean ± sample std" to 2 decimals (std 0 for one value); `signed`: the mean with its sign, never -0.00."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    mean = round(float(array.mean()), 2) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{mean:{'+' if signed else ''}.2f} ± {std:.2f}"


# ---- Table 6: cost ----

def _cost_rows(runs: list[dict], dataset: str) -> list[tuple[str, list[dict]]]:
    rows = []
    for row in table1_rows():
        if row.method == "mst":
            continue
        cell = _by_run([r for r in runs if r["dataset"] == dataset and row.matches(r) and r.get("cost")])
        if cell:
            rows.append((row.label, cell))
    for stage, label in (("mst_s1", "MST-Distill phase 1 (collaborative init., 3 networks)"),
                         ("mst_s2", "MST-Distill phase 2 (specialist adaptation, MaskNets)"),
                         ("mst_s3", "MST-Distill phase 3 (dynamic distillation)")):
        cell = _by_run([r for r in runs if r["dataset"] == dataset and r["stage"] == stage and r.get("cost")])
        if cell:
            rows.append((label, cell))
    return rows


def _pipeline_cost(runs: list[dict], dataset: str, pick: Callable[[dict], bool]) -> dict[int, tuple[float, float]]:
    """Per seed: (summed train seconds, largest peak MB) of the runs `pick` selects."""
    out: dict[int, tuple[float, float]] = {}
    for r in _by_run([r for r in runs if r["dataset"] == dataset and r.get("cost") and pick(r)]):
        seconds, peak = out.get(r["seed"], (0.0, 0.0))
        out[r["seed"]] = (seconds + r["cost"]["train_s"], max(peak, r["cost"].get("peak_mb") or 0.0))
    return out


def table6_markdown(runs: list[dict], datasets: list[str]) -> str:
    """Per method: runs, epochs run, train time per run and peak memory; then MST-Distill's end-to-end cost
    (phases 1–3, both targets) against the KD pipeline's (its teachers plus KD students of both targets from
    the MM and CM teachers), per seed, as ratios."""
    lines = []
    for dataset in datasets:
        rows = _cost_rows(runs, dataset)
        if not rows:
            continue
        spec = dataset_spec(dataset)
        lines += [f"### {spec.display_name}", "", "| Method | Runs | Epochs run | Train time per run (s) | "
                  "Peak memory (MB) |", "|---|---:|---:|---:|---:|"]
        for label, cell in rows:
            peaks = [r["cost"]["peak_mb"] for r in cell if r["cost"].get("peak_mb") is not None]
            lines.append(f"| {label} | {len(cell)} | {np.mean([r['epochs'] for r in cell]):.1f} | "
                         f"{_mean_std([r['cost']['train_s'] for r in cell])} | "
                         f"{f'{max(peaks):.1f}' if peaks else '–'} |")
        mst = _pipeline_cost(runs, dataset, lambda r: r["stage"] in ("mst_s1", "mst_s2", "mst_s3"))
        kd = _pipeline_cost(runs, dataset, lambda r: (r["stage"] == "teachers" and r["setting"] == "teacher")
                            or (r["stage"] == "distill" and r["method"] == "kd"))
        seeds = sorted(set(mst) & set(kd))
        if seeds:
            time_ratio = [mst[s][0] / kd[s][0] for s in seeds]
            mem_ratio = [mst[s][1] / kd[s][1] for s in seeds if kd[s][1] > 0]
            lines += ["", "| Pipeline (per seed, both targets) | Train time (s) | Peak memory (MB) |",
                      "|---|---:|---:|",
                      f"| KD: teachers (MM, both unimodal) + KD (MM) and KD (CM) students | "
                      f"{_mean_std([kd[s][0] for s in seeds])} | {max(kd[s][1] for s in seeds):.1f} |",
                      f"| MST-Distill: phases 1, 2 and 3 | {_mean_std([mst[s][0] for s in seeds])} | "
                      f"{max(mst[s][1] for s in seeds):.1f} |",
                      f"| **MST-Distill / KD** | **{_mean_std(time_ratio)} ×** | "
                      + (f"**{_mean_std(mem_ratio)} ×** |" if mem_ratio else "– |")]
        lines.append("")
    if not lines:
        return "No cost records (results predate run costs).\n"
    device = sorted({r.get("cost", {}).get("device", "") for r in runs} - {""})
    return "\n".join(["Training cost (paper Table 6), as measured by this run of the pipeline.", ""] + lines + [
        "Train time: wall time of a run's training and evaluation (all its phases), mean ± sample std over runs; "
        "runs of one stage run side by side (`workers`), so times include that sharing. Peak memory: the largest "
        "growth of a run's peak memory over its start, over the row's runs (CUDA: allocated memory, exact; CPU: the "
        "resident set of the worker process, where a run reuses memory an earlier run of the same worker freed, so "
        "the figure is a lower bound; `python -m benchmarks.method_cost` measures each method in a fresh process). "
        "Epochs run: the main phase's, mean over runs (early stopping ends runs at different epochs)."
        + (f" Device: {', '.join(device)}." if device else "")]) + "\n"


# ---- Tables 7 and 8, Figs. 5, 7 and 8: accuracy comparisons ----

def _variant_groups(runs: list[dict], dataset: str, output: str) -> dict[str, list[dict]]:
    """Label -> phase-3 runs, for one of the variant outputs: the default pipeline's MST-Distill first."""
    groups = {DEFAULT_VARIANT_LABELS[output]: [r for r in runs if r["dataset"] == dataset
                                               and r["stage"] == "mst_s3"]}
    for name, variant in MST_VARIANTS.items():
        if variant.output == output:
            groups[variant.label] = [r for r in runs if r["dataset"] == dataset and r["stage"] == "mst_variants"
                                     and r["setting"] == name and r["phase"] == "dynamic_distillation"]
    return {label: cell for label, cell in groups.items() if cell}


def _comparison_table(groups: dict[str, list[dict]], dataset: str, first_header: str) -> list[str]:
    spec = dataset_spec(dataset)
    modalities = [spec.modalities[t] for t in TARGETS]
    lines = [f"| {first_header} | " + " | ".join(f"{spec.display_name} {m.capitalize()}" for m in modalities)
             + f" | {spec.display_name} Mean |", "|---|" + "---:|" * (len(modalities) + 1)]
    cells = []
    for label, cell in groups.items():
        row = [summarise_runs([r for r in cell if r["target"] == m]) if any(r["target"] == m for r in cell)
               else None for m in modalities]
        seeds = sorted({r["seed"] for r in cell})
        per_seed = [float(np.mean([r["test_accuracy"] for r in cell if r["seed"] == s])) for s in seeds]
        mean = summarise(per_seed) if per_seed else None
        lines.append(f"| {label} | " + " | ".join(_cell_text(c, None) for c in [*row, mean]) + " |")
        cells += [(f"{label}, {spec.display_name} {m}", c) for m, c in zip(modalities, row)]
    return lines + flag_captions(cells)


def variant_table_markdown(runs: list[dict], datasets: list[str], output: str, title: str, header: str,
                           caption: str) -> str:
    """Table 7 or 8: MST-Distill with the paper's choice against the variant, per dataset."""
    parts = []
    for dataset in datasets:
        groups = _variant_groups(runs, dataset, output)
        if len(groups) > 1:
            parts += [f"### {dataset_spec(dataset).display_name}", "", *_comparison_table(groups, dataset, header), ""]
    if not parts:
        return f"{title}: no results (run the mst_variants stage).\n"
    return "\n".join([title, "", *parts, caption]) + "\n"


def _accuracies(cell: list[dict], modality: str) -> list[float]:
    return [100.0 * r["test_accuracy"] for r in sorted(cell, key=lambda r: r["seed"]) if r["target"] == modality]


def _wo_kd_means(runs: list[dict], dataset: str) -> dict[str, float]:
    spec = dataset_spec(dataset)
    out = {}
    for t in TARGETS:
        values = [100.0 * r["test_accuracy"] for r in runs if r["dataset"] == dataset and r["method"] == "ce"
                  and r["setting"] == "wo_kd" and r["target"] == spec.modalities[t]]
        if values:
            out[spec.modalities[t]] = float(np.mean(values))
    return out


def figure_panels(runs: list[dict], dataset: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """The seed values behind Figs. 5, 7 and 8 of one dataset: {figure: {panel: {group: [accuracy %]}}}."""
    spec = dataset_spec(dataset)
    modalities = [spec.modalities[t] for t in TARGETS]
    out: dict = {}
    groups = _variant_groups(runs, dataset, "fig5")
    if len(groups) > 1:
        order = ["MM", "CM", DEFAULT_VARIANT_LABELS["fig5"]]
        out["fig5"] = {m: {g: _accuracies(groups[g], m) for g in order if g in groups} for m in modalities}
    teachers = [r for r in runs if r["dataset"] == dataset and r["stage"] == "teachers" and r["setting"] == "teacher"]
    if teachers:
        names = [spec.modality_name("mm"), *modalities]
        out["fig7"] = {spec.display_name: {n: _accuracies(teachers, n) for n in names
                                           if any(r["target"] == n for r in teachers)}}
    kd = [r for r in runs if r["dataset"] == dataset and r["stage"] == "distill" and r["method"] == "kd"]
    if {r["teacher"] for r in kd} >= {"mm", "cm"}:
        out["fig8"] = {m: {f"KD ({c.upper()})": _accuracies([r for r in kd if r["teacher"] == c], m)
                           for c in ("mm", "cm")} for m in modalities}
    return out


FIGURES = {
    "fig5": ("fig5_teacher_sets_{d}.png", "{name}: MST-Distill with the MM, CM or MM+CM teacher set (paper Fig. 5)",
             True),
    "fig7": ("fig7_unimodal_vs_mm_{d}.png",
             "{name}: multimodal vs unimodal networks, each trained alone (paper Fig. 7)", False),
    "fig8": ("fig8_mm_vs_cm_{d}.png", "{name}: KD students from the MM or the CM teacher (paper Fig. 8)", True),
}


def figure_jobs(runs: list[dict], datasets: list[str], figures_dir: Path) -> list[Callable[[], Path]]:
    """Drawing callables for Figs. 5, 7 and 8 of every dataset with the results they need (box plots over seeds;
    Figs. 5 and 8 draw the w/o KD mean as a dashed line)."""
    from pipeline.reporting.figures import box_plots_png

    jobs = []
    for dataset in datasets:
        name = dataset_spec(dataset).display_name
        reference = _wo_kd_means(runs, dataset)
        for figure, panels in figure_panels(runs, dataset).items():
            file, title, with_reference = FIGURES[figure]
            jobs.append(lambda p=panels, f=figures_dir / file.format(d=dataset), t=title.format(name=name),
                        ref=reference if with_reference else None: box_plots_png(p, f, t, ref, "w/o KD mean"))
    return jobs


# ---- Table 1 as paired differences ----

def paired_markdown(runs: list[dict], datasets: list[str]) -> str:
    """Each Table 1 row's gain over w/o KD, paired by seed (the same split and seed on both sides): mean ±
    sample std of the per-seed differences in points, and on how many seeds the row beats w/o KD. Pairing
    removes the split-to-split spread that dominates the plain table's standard deviations."""
    lines = ["Table 1 as gains over w/o KD, paired by seed (points of test accuracy).", ""]
    for dataset in datasets:
        spec = dataset_spec(dataset)
        modalities = [spec.modalities[t] for t in TARGETS]
        rows = table1_rows()
        base = {m: {r["seed"]: r["test_accuracy"] for r in runs if r["dataset"] == dataset and r["target"] == m
                    and rows[0].matches(r)} for m in modalities}
        lines += ["| Method | " + " | ".join(f"{spec.display_name} {m.capitalize()}" for m in modalities) + " |",
                  "|---|" + "---:|" * len(modalities)]
        for row in rows[1:]:
            cells = []
            for m in modalities:
                pairs = [(r["test_accuracy"], base[m][r["seed"]]) for r in runs if r["dataset"] == dataset
                         and r["target"] == m and row.matches(r) and r["seed"] in base[m]]
                if not pairs:
                    cells.append("–")
                    continue
                gains = [100.0 * (a - b) for a, b in pairs]
                flagged = any(problems_of(r) for r in runs if r["dataset"] == dataset and r["target"] == m
                              and row.matches(r))
                cells.append(f"{_mean_std(gains, signed=True)} ({sum(g > 0 for g in gains)}/{len(gains)})"
                             + (" †" if flagged else ""))
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Per seed: the row's test accuracy minus the w/o KD network's (same split column, same seed); mean ± "
                 "sample std over seeds, and (k/n) the seeds on which the row is better. † as in Table 1 "
                 "(reports/health.md).")
    return "\n".join(lines) + "\n"



# ---- run health ----

def health_markdown(runs: list[dict]) -> str:
    """Every flagged run (training/health.py) with its MLflow run name, and the counts per stage."""
    assessed = [r for r in runs if r.get("health")]
    flagged = [r for r in assessed if problems_of(r)]
    lines = ["# Run health", "",
             f"{len(assessed)} trained networks assessed, {len(flagged)} flagged. A run is flagged when it never "
             "rose above chance on validation (more than 3 binomial standard deviations above 1/C: it stayed on its "
             "initial plateau), when 90 % or more of its test predictions are one class, or when its training loss "
             "became non-finite. Table cells with a flagged seed carry †.", ""]
    if not flagged:
        return "\n".join(lines + ["No run is flagged."]) + "\n"
    lines += ["| Stage | Method | Setting | Teacher | Target | Seed | Problems | Test acc. (%) | MLflow run |",
              "|---|---|---|---|---|---:|---|---:|---|"]
    for r in sorted(flagged, key=lambda r: (r["dataset"], r["stage"], r["method"], r["setting"], r["teacher"],
                                            r["target"], r["seed"])):
        acc = "–" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.1f}"
        lines.append(f"| {r['stage']} | {r['method']} | {r['setting']} | {r['teacher']} | {r['target']} | "
                     f"{r['seed']} | {', '.join(problems_of(r))} | {acc} | `{r['run_name']}` |")
    if any(r["method"] == "c2kd" for r in flagged):
        lines += ["", "C²KD: its students are trained with SGD at lr 0.01 through proxy BatchNorm heads, as the "
                      "authors run it (baselines-spec.md §2.10); a student whose first-layer channels die predicts "
                      "one class. These runs are kept and counted, not retried."]
    return "\n".join(lines) + "\n"


# ---- the paper's values beside ours ----

def read_paper_values(path: Path = PAPER_VALUES) -> dict[tuple[str, str, str, str], float]:
    """The paper's published numbers: (dataset, table, row key, target modality) -> value (%)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(line for line in handle if not line.startswith("#"))]
    return {(r["dataset"], r["table"], r["row"], r["target"]): float(r["value"]) for r in rows}


def paper_comparison_markdown(t1: dict, t3: dict, datasets: list[str],
                              paper: dict[tuple[str, str, str, str], float]) -> str:
    """Ours beside the paper's value and the difference (ours − paper) for every cell the paper reports; a
    dataset the paper does not have, or whose values are not transcribed, says so."""
    lines = ["# Ours beside the paper", ""]
    for dataset in datasets:
        spec = dataset_spec(dataset)
        values = {k: v for k, v in paper.items() if k[0] == dataset}
        if not spec.in_paper:
            lines += [f"{spec.display_name}: not a dataset of the paper (this project's embedded stand-in), so there "
                      "is no published number to compare with.", ""]
            continue
        if not values:
            lines += [f"{spec.display_name}: the paper's values are not transcribed yet; add them to "
                      f"pipeline/reporting/{PAPER_VALUES.name} (dataset, table, row, target, value).", ""]
            continue
        lines += [f"### {spec.display_name}", "", "| Table | Row | Target | Ours | Paper | Ours − paper |",
                  "|---|---|---|---:|---:|---:|"]
        labels = {row.key: row.label for row in table1_rows()} | {k: s.label for k, s in STAGE_SETTINGS.items()}
        for (_, table, row, target), value in sorted(values.items()):
            source = t1 if table == "table1" else t3
            cell = (source.get(dataset, {}).get(target, {}).get(row) if table == "table1"
                    else source.get(dataset, {}).get(row, {}).get(target))
            ours = f"{cell['mean']:.2f}" if cell else "–"
            diff = f"{cell['mean'] - value:+.2f}" if cell else "–"
            lines.append(f"| {table} | {labels.get(row, row)} | {target} | {ours} | {value:.2f} | {diff} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def markdown_outputs(runs: list[dict], datasets: list[str], t1: dict, t3: dict) -> dict[str, str]:
    """Every text file of this module, by name under reports/."""
    return {
        "table1_paired.md": paired_markdown(runs, datasets),
        "table6.md": table6_markdown(runs, datasets),
        "table7.md": variant_table_markdown(
            runs, datasets, "table7", "Stage 1 of MST-Distill, joint vs DML-style detached alignment (paper Table 7).",
            "Stage 1", "Test accuracy (%), mean ± sample std over seeds. Joint: the paper's collaborative "
            "initialisation (every KL trains both networks); detached: each network aligns to its peers' detached "
            "predictions (`mst.collaborative_init_detach: true`); phases 2 and 3 re-run on the detached networks."),
        "table8.md": variant_table_markdown(
            runs, datasets, "table8", "Load balancing of the GateNet, KL vs CV (paper Table 8).", "Load balancing",
            "Test accuracy (%), mean ± sample std over seeds. KL: KL(uniform ‖ mean routing distribution), paper "
            "Eq. 17; CV: coefficient of variation (std / mean, not squared, as the authors) of the routing importance "
            "(`mst.lb_mode: cv`); phase 3 "
            "re-runs on the default phase-1 networks and MaskNets."),
        "health.md": health_markdown(runs),
        "paper_comparison.md": paper_comparison_markdown(t1, t3, datasets, read_paper_values()),
    }
