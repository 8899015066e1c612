"""`dvc plots show` that renders without a network: DVC's default page loads Vega from a CDN, so offline its
charts are blank. This writes an HTML template whose Vega, Vega-Lite and Vega-Embed come from the
`vl-convert-python` wheel (installed by requirements.txt), then runs `dvc plots show` with it.

    python -m pipeline.reporting.offline_plots [--out dvc_plots]

Open <out>/index.html in a browser: every plot of dvc.yaml's `plots:` section, with no request leaving
the machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BUNDLE = "vega-bundle.js"
TEMPLATE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>DVC plots</title>
{refresh_tag}
<script src="%s"></script>
</head>
<body>
{plot_divs}
</body>
</html>
""" % BUNDLE


def write_template(out: Path) -> Path:
    """Write the Vega bundle and an HTML template that loads it under `out`; returns the template path."""
    import vl_convert

    out.mkdir(parents=True, exist_ok=True)
    (out / BUNDLE).write_text(vl_convert.javascript_bundle())
    template = out / "template.html"
    template.write_text(TEMPLATE)
    return template


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("dvc_plots"), help="output folder (default: dvc_plots)")
    args = p.parse_args()
    template = write_template(args.out)
    result = subprocess.run(["dvc", "plots", "show", "--html-template", str(template), "-o", str(args.out)])
    if result.returncode == 0:
        print(f"open {args.out / 'index.html'}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
