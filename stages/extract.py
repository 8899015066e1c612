"""DVC stage: extract one paper dataset from its publishers' raw files into the authors' preprocessed layout
(face crops and MFCCs for RAVDESS, VGG19 and VGGish features for VGGSound-50k, ResNet-50 and BERTweet features
for CrisisMMD-V2), which its prepare stage then reads."""

import json
from pathlib import Path

from pipeline.extraction.settings import ExtractionParams, run_extraction
from pipeline.io import check_writable
from pipeline.params import load_blocks
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--raw", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    blocks = load_blocks(args.params, {"extraction": ExtractionParams, "device": str})
    check_writable(args.out.parent)
    summary = run_extraction(args.dataset, args.raw, args.out, blocks["extraction"], blocks["device"])
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    run_stage(main)
