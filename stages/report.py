"""DVC stage: aggregate every run over seeds into reports/ (Tables 1, 2 and 3, teachers table, top-k sweep,
figures, DVC metrics and plot data)."""

from pathlib import Path

from pipeline.io import check_writable
from pipeline.data.catalog import SegmentationParams
from pipeline.params import load_blocks
from pipeline.reporting.reports import write_reports
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--results", required=True, type=Path, help="folder of the stages' results files")
    p.add_argument("--out", required=True, type=Path, help="folder receiving the reports")
    args = p.parse_args()
    blocks = load_blocks(args.params, {"datasets": dict[str, str], "segmentation": SegmentationParams})
    check_writable(args.out)
    write_reports(args.results, args.out, list(blocks["datasets"]), list(blocks["segmentation"].datasets))
    print((args.out / "table1.md").read_text())
    print((args.out / "table2.md").read_text())


if __name__ == "__main__":
    run_stage(main)
