"""DVC stage: aggregate every run over seeds into reports/ (Table 1, teachers table, DVC metrics)."""

from pathlib import Path

from pipeline.params import load_params
from pipeline.reporting.tables import ResultsError, write_reports
from stages.common import parser, run_stage


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--results", default=Path("results"), type=Path)
    p.add_argument("--out", default=Path("reports"), type=Path)
    args = p.parse_args()
    params = load_params(args.params)
    try:
        write_reports(args.results, args.out, list(params.datasets))
    except ResultsError as err:
        raise FileNotFoundError(str(err)) from err
    print((args.out / "table1.md").read_text())


if __name__ == "__main__":
    run_stage(main)
