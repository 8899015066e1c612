"""DVC stage: one distillation method on one dataset, with each teacher configuration its params list,
both targets and every seed. Paths follow the pipeline's layout unless given."""

import dataclasses
from pathlib import Path

from pipeline.benchmark import distill, load_dataset, open_device, write_json
from pipeline.methods import method_class
from pipeline.params import ParamsError, load_params
from pipeline.tracking import open_tracker
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--method", required=True, help="registered method name, e.g. kd, mlld, crd")
    p.add_argument("--dataset", required=True, help="dataset key, e.g. av_digits")
    p.add_argument("--raw", type=Path, help="raw folder (default: params.yaml datasets.<dataset>)")
    p.add_argument("--prepared", type=Path, help="default: data/prepared/<dataset>")
    p.add_argument("--teachers", type=Path, help="default: models/<dataset>/teachers")
    p.add_argument("--results", type=Path, help="default: results/<dataset>/<method>.json")
    args = p.parse_args()
    params = load_params(args.params)
    method_class(args.method)  # fail on an unknown method before loading anything
    if args.dataset not in params.datasets:
        raise ParamsError(f"{args.params}: datasets: {args.dataset!r} is not enabled; enabled: "
                          f"{', '.join(params.datasets)}")
    raw = args.raw or Path(params.datasets[args.dataset])
    prepared = args.prepared or Path("data/prepared") / args.dataset
    teachers = args.teachers or Path("models") / args.dataset / "teachers"
    results = args.results or Path("results") / args.dataset / f"{args.method}.json"
    loaded = load_dataset(params, args.dataset, raw, prepared, open_device(params))
    with open_tracker(params.tracking.mlflow, args.dataset, Path(args.params), args.method) as tracker:
        records = distill(params, args.method, loaded, teachers, tracker)
    write_json(results, {"runs": [dataclasses.asdict(r) for r in records]})


if __name__ == "__main__":
    run_stage(main)
