"""Top-k sweep of MST-Distill stage 3 (paper Fig. 6): stage 3 re-run for every k = 1..N on the stage-1
checkpoints and stage-2 MaskNets that `dvc repro` produced, every seed and both targets.

    python -m stages.topk_sweep [--dataset av_digits]

Writes reports/topk_sweep_<dataset>.md, .csv, .json and .png; every run is logged to MLflow.
"""

import dataclasses
import json
from pathlib import Path

from pipeline import mst_pipeline
from pipeline.benchmark import load_dataset, open_device, write_json
from pipeline.data.catalog import dataset_spec
from pipeline.params import load_params
from pipeline.reporting.figures import topk_sweep_png
from pipeline.reporting.tables import summarise
from pipeline.tracking import open_tracker
from stages.common import parser, run_stage


def sweep_markdown(spec, ks: list[int], cells: dict) -> str:
    header = "| k | " + " | ".join(f"{spec.display_name} {m.capitalize()}" for m in spec.modalities.values()) + " |"
    lines = [header, "|---:|" + "---:|" * len(spec.modalities)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{cells[m][k]['mean']:.2f} ± {cells[m][k]['std']:.2f}"
                                              for m in spec.modalities.values()) + " |")
    lines += ["", "MST-Distill stage 3 with top-k routing (paper Fig. 6): test accuracy (%), mean ± sample std over "
                  "seeds; stages 1 and 2 are shared by every k."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", default="av_digits")
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args()
    params = load_params(args.params)
    if args.dataset not in params.datasets:
        raise FileNotFoundError(f"dataset {args.dataset!r} is not enabled in {args.params}")
    spec = dataset_spec(args.dataset)
    models = Path("models") / args.dataset / "mst"
    for folder in (models / "stage1", models / "stage2"):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing; run `dvc repro` first (the sweep reuses stages 1 and 2)")
    mst = params.mst_effective()
    n_ways = (2 if mst.teacher_set == "mm+cm" else 1) * mst.mask_layer_num
    ks = list(range(1, n_ways + 1))
    loaded = load_dataset(params, args.dataset, Path(params.datasets[args.dataset]),
                          Path("data/prepared") / args.dataset, open_device(params))
    records = []
    with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), "topk_sweep") as tracker:
        for k in ks:
            records += mst_pipeline.stage3(dataclasses.replace(params, topk=k), loaded, models / "stage1",
                                           models / "stage2", tracker)
    cells = {spec.modalities[t]: {k: summarise([r["test_accuracy"] for r in records if r["topk"] == k
                                                and r["target"] == t]) for k in ks} for t in ("m1", "m2")}
    stem = args.out / f"topk_sweep_{args.dataset}"
    write_json(stem.with_suffix(".json"), {"runs": records})
    stem.with_suffix(".md").write_text(sweep_markdown(spec, ks, cells))
    stem.with_suffix(".csv").write_text("k," + ",".join(f"{m}_mean,{m}_std" for m in cells) + "\n" + "".join(
        f"{k}," + ",".join(f"{cells[m][k]['mean']},{cells[m][k]['std']}" for m in cells) + "\n" for k in ks))
    topk_sweep_png(ks, {m: [cells[m][k]["mean"] for k in ks] for m in cells},
                   {m: [cells[m][k]["std"] for k in ks] for m in cells}, stem.with_suffix(".png"),
                   f"{spec.display_name}: MST-Distill top-k sweep")
    print(stem.with_suffix(".md").read_text())
    print(json.dumps({m: {k: c["mean"] for k, c in v.items()} for m, v in cells.items()}))


if __name__ == "__main__":
    run_stage(main)
