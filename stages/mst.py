"""DVC stage: one of MST-Distill's three stages (1: collaborative initialisation, 2: specialised teacher
adaptation, 3: dynamic distillation) for one dataset, every seed and both targets."""

from pathlib import Path

from pipeline import mst_pipeline
from pipeline.benchmark import load_dataset, open_device, write_json
from pipeline.params import load_params
from pipeline.tracking import open_tracker
from stages.common import run_stage, training_parser


def main() -> None:
    p = training_parser(__doc__)
    p.add_argument("--stage", required=True, type=int, choices=(1, 2, 3))
    p.add_argument("--stage1", required=True, type=Path, help="stage-1 checkpoints folder")
    p.add_argument("--masks", type=Path, help="stage-2 MaskNets folder (stages 2 and 3)")
    args = p.parse_args()
    params = load_params(args.params)
    if args.stage > 1 and args.masks is None:
        p.error("--masks is required for stages 2 and 3")
    loaded = load_dataset(params, args.dataset, args.raw, args.prepared, open_device(params))
    with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), f"mst_s{args.stage}") as tracker:
        if args.stage == 1:
            records = mst_pipeline.stage1(params, loaded, args.stage1, tracker)
        elif args.stage == 2:
            records = mst_pipeline.stage2(params, loaded, args.stage1, args.masks, tracker)
        else:
            records = [r.__dict__ for r in mst_pipeline.stage3(params, loaded, args.stage1, args.masks, tracker)]
    write_json(args.results, {"runs": records})


if __name__ == "__main__":
    run_stage(main)
