"""DVC stage: build the AV-Digits dataset (AV-MNIST layout) from packaged MNIST digits and eSpeak NG."""

import json
import shutil
from pathlib import Path

from pipeline.data.av_digits import AVDigitsRecipe, write_av_digits
from pipeline.io import check_writable
from pipeline.params import load_blocks
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    recipe = load_blocks(args.params, {"av_digits": AVDigitsRecipe})["av_digits"]
    check_writable(args.out.parent)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    summary = write_av_digits(recipe, tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)  # the folder appears only once complete
    print(json.dumps(summary))


if __name__ == "__main__":
    run_stage(main)
