"""Every report of the pipeline under reports/, written by the report stage: Tables 1 and 3 and the rest of
the paper's outputs (tables.py, paper_outputs.py), the DVC metrics and the DVC plot data."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from pipeline.data.catalog import dataset_spec
from pipeline.reporting import paper_outputs
from pipeline.reporting.table2 import table2, table2_csv, table2_markdown, table2_metrics
from pipeline.reporting.tables import (TARGETS, learning_curves, metrics_summary, read_runs, routing_summary, table1,
                                       table1_csv, table1_markdown, table3, table3_csv, table3_markdown,
                                       teachers_markdown, teachers_summary, topk_markdown, topk_summary)


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_reports(results_dir: Path, out_dir: Path, datasets: list[str],
                  segmentation_datasets: list[str] | None = None) -> dict:
    """Write Tables 1, 2 and 3 (.md, .csv), teachers.md, the top-k sweep (.md), Tables 6, 7 and 8, the run
    health and paper comparison reports, metrics.json, the figures (figures/*.png) and the DVC plot data
    (plots/*.csv) under `out_dir`; return the metrics. `datasets`: the classification datasets (Table 1 and
    the rest); `segmentation_datasets`: Table 2's. Every text is computed before anything is written."""
    from pipeline.reporting.figures import routing_curves_png, topk_sweep_png

    segmentation_datasets = segmentation_datasets or []
    runs = read_runs(results_dir, [*datasets, *segmentation_datasets])
    t1, t3, teachers = table1(runs, datasets), table3(runs, datasets), teachers_summary(runs, datasets)
    t2 = table2(runs, segmentation_datasets)
    metrics = metrics_summary(t1, t3)
    metrics.update(table2_metrics(t2))
    paper = paper_outputs.read_paper_values()
    outputs = {"table1.md": table1_markdown(t1, datasets, paper), "table1.csv": table1_csv(t1, datasets, paper),
               "table2.md": table2_markdown(t2, segmentation_datasets),
               "table2.csv": table2_csv(t2, segmentation_datasets),
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
                out_dir / "figures" / f"fig6_topk_{d}.png",
                f"{dataset_spec(d).display_name}: MST-Distill top-k sweep (paper Fig. 6)"))
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
                    ["epoch", *keys], [[e + 1, *["" if np.isnan(v) else round(float(v), 4) for v in row]]
                                       for e, row in enumerate(values)])
    outputs["topk_sweep.md"] = "\n".join(sweeps) if sweeps else "No top-k sweep results.\n"
    outputs.update(paper_outputs.markdown_outputs(runs, datasets, t1, t3))
    figures += paper_outputs.figure_jobs(runs, datasets, out_dir / "figures")
    for name, text in outputs.items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    for draw in figures:
        draw()
    return metrics
