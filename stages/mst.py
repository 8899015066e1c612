"""DVC stage: one step of MST-Distill on one dataset, every seed and both targets: a phase
(`collaborative_init`, `specialist_adaptation`, `dynamic_distillation`), the stage ablation of paper
Table 3 (`ablation`), the top-k sweep of paper Fig. 6 (`topk_sweep`) or the method variants of paper
Tables 7, 8 and Fig. 5 (`variants`)."""

from pathlib import Path

from pipeline.io import check_writable
from pipeline.orchestration import mst as mst_stages
from pipeline.orchestration.config import load_params
from pipeline.orchestration.jobs import open_device, resumable_stage, stage_id
from pipeline.orchestration.runs import load_dataset, write_records
from pipeline.tracking import open_tracker
from stages.common import parser, run_stage

STEPS = ("collaborative_init", "specialist_adaptation", "dynamic_distillation", "ablation", "topk_sweep", "variants")
# which folders each step reads (r) and writes (w)
FOLDERS = {"collaborative_init": {"stage1": "w"}, "specialist_adaptation": {"stage1": "r", "masks": "w"},
           "dynamic_distillation": {"stage1": "r", "masks": "r"}, "topk_sweep": {"stage1": "r", "masks": "r"},
           "ablation": {"teachers": "r", "stage1": "r", "masks": "r"},
           "variants": {"stage1": "r", "masks": "r", "variant_models": "w"}}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("step", choices=STEPS)
    p.add_argument("--dataset", required=True, help="dataset key, e.g. av_digits")
    p.add_argument("--prepared", required=True, type=Path, help="the dataset's prepared folder")
    p.add_argument("--results", required=True, type=Path, help="JSON file receiving one record per run")
    p.add_argument("--stage1", type=Path, help="collaborative-initialisation networks")
    p.add_argument("--masks", type=Path, help="specialist-adaptation MaskNets")
    p.add_argument("--teachers", type=Path, help="the teachers stage's checkpoints (ablation)")
    p.add_argument("--variant-models", type=Path, help="folder receiving the variants' networks and MaskNets")
    args = p.parse_args()
    for folder in FOLDERS[args.step]:
        if getattr(args, folder) is None:
            p.error(f"--{folder.replace('_', '-')} is required for {args.step}")
    params = load_params(args.params)
    device = open_device(params)
    check_writable(args.results, *[getattr(args, f) for f, mode in FOLDERS[args.step].items() if mode == "w"])
    loaded = load_dataset(params, args.dataset, args.prepared, device)
    name = {"collaborative_init": "mst_s1", "specialist_adaptation": "mst_s2",
            "dynamic_distillation": "mst_s3"}.get(args.step, f"mst_{args.step}")
    sid = stage_id(name, args.dataset)
    inputs = [args.prepared, *[getattr(args, f) for f, mode in FOLDERS[args.step].items() if mode == "r"]]
    with resumable_stage(sid, Path(args.params), inputs, device):
        with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), name, sid) as tracker:
            if args.step == "collaborative_init":
                records = mst_stages.mst_collaborative_init(params, loaded, args.stage1, tracker)
            elif args.step == "specialist_adaptation":
                records = mst_stages.mst_specialist_adaptation(params, loaded, args.stage1, args.masks, tracker)
            elif args.step == "dynamic_distillation":
                records = mst_stages.mst_dynamic_distillation(params, loaded, args.stage1, args.masks, tracker)
            elif args.step == "variants":
                records = mst_stages.mst_variants(params, loaded, args.stage1, args.masks, args.variant_models, tracker)
            elif args.step == "topk_sweep":
                records = mst_stages.topk_sweep(params, loaded, args.stage1, args.masks, tracker)
            else:
                records = mst_stages.mst_ablation(params, loaded, args.teachers, args.stage1, args.masks, tracker)
        write_records(args.results, records)


if __name__ == "__main__":
    run_stage(main)
