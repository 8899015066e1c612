"""DVC stage: one baseline on one dataset, with each teacher configuration its params list, both targets and
every seed."""

from pathlib import Path

from pipeline.data.catalog import dataset_spec
from pipeline.io import check_writable
from pipeline.methods import method_class
from pipeline.orchestration.distill import distill
from pipeline.orchestration.config import load_params
from pipeline.orchestration.jobs import open_device, resumable_stage, stage_id
from pipeline.orchestration.runs import check_applicable, load_dataset, write_records
from pipeline.tracking import open_tracker
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--method", required=True, help="registered method name, e.g. kd, mlld, crd")
    p.add_argument("--dataset", required=True, help="dataset key, e.g. av_digits")
    p.add_argument("--prepared", required=True, type=Path, help="the dataset's prepared folder")
    p.add_argument("--teachers", required=True, type=Path, help="the teachers stage's checkpoints")
    p.add_argument("--results", required=True, type=Path, help="JSON file receiving one record per run")
    args = p.parse_args()
    params = load_params(args.params)
    device = open_device(params)
    method_class(args.method)  # fail on an unknown method before loading anything
    check_applicable(args.method, dataset_spec(args.dataset))
    check_writable(args.results)
    loaded = load_dataset(params, args.dataset, args.prepared, device)
    name = stage_id("distill", args.dataset, args.method)
    with resumable_stage(name, Path(args.params), [args.prepared, args.teachers], device):
        with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), args.method, name) as tracker:
            records = distill(params, args.method, loaded, args.teachers, tracker)
        write_records(args.results, records)


if __name__ == "__main__":
    run_stage(main)
