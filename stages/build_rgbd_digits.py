"""DVC stage: build RGB-D Digits (NYU-Depth-V2 raw layout) from packaged MNIST digits, and its sample figure."""

import json
import shutil
from pathlib import Path

from pipeline.data.rgbd_digits import RGBDDigitsRecipe, write_rgbd_digits
from pipeline.io import check_writable
from pipeline.params import load_blocks
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--figure", required=True, type=Path, help="PNG of a few scenes (RGB, depth, labels)")
    args = p.parse_args()
    recipe = load_blocks(args.params, {"rgbd_digits": RGBDDigitsRecipe})["rgbd_digits"]
    check_writable(args.out.parent, args.figure)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    summary = write_rgbd_digits(recipe, tmp, figure=args.figure)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)  # the folder appears only once complete
    print(json.dumps(summary))


if __name__ == "__main__":
    run_stage(main)
