"""DVC stage: one of MST-Distill's three stages (1: collaborative initialisation, 2: specialised teacher
adaptation, 3: dynamic distillation), or the stage ablation of paper Table 3 (`ablation`), for one
dataset, every seed and both targets."""

from pathlib import Path

from pipeline import mst_pipeline
from pipeline.benchmark import load_dataset, open_device, write_json
from pipeline.params import load_params
from pipeline.tracking import open_tracker
from stages.common import run_stage, training_parser


def main() -> None:
    p = training_parser(__doc__)
    p.add_argument("--stage", required=True, choices=("1", "2", "3", "ablation"))
    p.add_argument("--stage1", required=True, type=Path, help="stage-1 checkpoints folder")
    p.add_argument("--masks", type=Path, help="stage-2 MaskNets folder (stages 2, 3 and ablation)")
    p.add_argument("--teachers", type=Path, help="teachers-stage checkpoints (ablation)")
    args = p.parse_args()
    params = load_params(args.params)
    if args.stage != "1" and args.masks is None:
        p.error("--masks is required for stages 2, 3 and ablation")
    if args.stage == "ablation" and args.teachers is None:
        p.error("--teachers is required for the ablation")
    loaded = load_dataset(params, args.dataset, args.raw, args.prepared, open_device(params))
    name = "mst_ablation" if args.stage == "ablation" else f"mst_s{args.stage}"
    with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), name) as tracker:
        if args.stage == "1":
            records = mst_pipeline.stage1(params, loaded, args.stage1, tracker)
        elif args.stage == "2":
            records = mst_pipeline.stage2(params, loaded, args.stage1, args.masks, tracker)
        elif args.stage == "3":
            records = mst_pipeline.stage3(params, loaded, args.stage1, args.masks, tracker)
        else:
            records = mst_pipeline.stage_ablation(params, loaded, args.teachers, args.stage1, args.masks, tracker)
    write_json(args.results, {"runs": records})


if __name__ == "__main__":
    run_stage(main)
