"""DVC stage: a single-teacher distillation method with MM and CM teachers, both targets, every seed."""

import dataclasses
from pathlib import Path

from pipeline.benchmark import distill, load_dataset, open_device, write_json
from pipeline.methods import method_class
from pipeline.params import load_params
from pipeline.tracking import open_tracker
from stages.common import run_stage, training_parser


def main() -> None:
    p = training_parser(__doc__)
    p.add_argument("--method", required=True)
    p.add_argument("--teachers", required=True, type=Path)
    args = p.parse_args()
    params = load_params(args.params)
    method_class(args.method)  # fail on an unknown method before loading anything
    loaded = load_dataset(params, args.dataset, args.raw, args.prepared, open_device(params))
    with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), args.method) as tracker:
        records = distill(params, args.method, loaded, args.teachers, tracker)
    write_json(args.results, {"runs": [dataclasses.asdict(r) for r in records]})


if __name__ == "__main__":
    run_stage(main)
