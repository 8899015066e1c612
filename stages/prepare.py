"""DVC stage: validate a dataset's raw files and write its prepared tensors, split file and summary."""

import json
from pathlib import Path

from pipeline.data.av_digits import AVDigitsRecipe
from pipeline.data.prepared import prepare_dataset
from pipeline.data.splits import SplitParams
from pipeline.params import load_blocks
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--raw", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    blocks = load_blocks(args.params, {"splits": SplitParams, "av_digits": AVDigitsRecipe})
    summary = prepare_dataset(args.dataset, args.raw, args.out, blocks["splits"], blocks)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_stage(main)
