"""DVC stage: per seed, train the multimodal and both unimodal networks (the MM and CM teachers, w/o KD)."""

from pathlib import Path

from pipeline.io import check_writable
from pipeline.orchestration.teachers import train_teachers
from pipeline.orchestration.config import load_params
from pipeline.orchestration.jobs import open_device, resumable_stage, stage_id
from pipeline.orchestration.runs import load_dataset, write_records
from pipeline.tracking import open_tracker
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True, help="dataset key, e.g. av_digits")
    p.add_argument("--prepared", required=True, type=Path, help="the dataset's prepared folder")
    p.add_argument("--models", required=True, type=Path, help="folder receiving the networks' checkpoints")
    p.add_argument("--results", required=True, type=Path, help="JSON file receiving one record per run")
    args = p.parse_args()
    params = load_params(args.params)
    device = open_device(params)
    check_writable(args.results, args.models)
    loaded = load_dataset(params, args.dataset, args.prepared, device)
    name = stage_id("teachers", args.dataset)
    with resumable_stage(name, Path(args.params), [args.prepared], device):
        with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), "teachers", name) as tracker:
            records = train_teachers(params, loaded, args.models, tracker)
        write_records(args.results, records)


if __name__ == "__main__":
    run_stage(main)
