"""DVC stage: per seed, train the multimodal and both unimodal networks (w/o KD and CM teachers)."""

import dataclasses
from pathlib import Path

from pipeline.benchmark import load_dataset, open_device, train_teachers, write_json
from pipeline.params import load_params
from pipeline.tracking import open_tracker
from stages.common import run_stage, training_parser


def main() -> None:
    p = training_parser(__doc__)
    p.add_argument("--models", required=True, type=Path)
    args = p.parse_args()
    params = load_params(args.params)
    loaded = load_dataset(params, args.dataset, args.raw, args.prepared, open_device(params))
    with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), "teachers") as tracker:
        records = train_teachers(params, loaded, args.models, tracker)
    write_json(args.results, {"runs": [dataclasses.asdict(r) for r in records]})


if __name__ == "__main__":
    run_stage(main)
