"""DVC stage: validate a dataset's raw files and write its split file and summary."""

import json
from pathlib import Path

from pipeline.benchmark import prepare_dataset
from pipeline.params import load_params
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--raw", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    summary = prepare_dataset(load_params(args.params), args.dataset, args.raw, args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_stage(main)
