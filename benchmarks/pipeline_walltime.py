"""Wall time of the default pipeline on a fresh clone: `dvc repro`, then a no-op `dvc repro`.

Usage (from the repository root, with the environment installed):
    python benchmarks/pipeline_walltime.py            # clones HEAD into a temporary folder
    python benchmarks/pipeline_walltime.py --keep     # keep the clone (its path is printed)

Runs the stages one by one in `dvc repro`'s order (`--force --single-item`: the pipeline is deterministic,
so without --force a clean clone would skip stages whose committed results it reproduces), so each
stage's time is known;
the total is their sum. Prints it, the no-op repro time, and each kind of training run's own wall time
as recorded in MLflow (`wall_time_s`; runs of one stage may overlap in worker processes).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed, result.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    workdir = Path(tempfile.mkdtemp(prefix="cmkd-bench-"))
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    print(f"fresh clone of {REPO} at {clone} (HEAD {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=clone, capture_output=True, text=True).stdout.strip()})")
    print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}")
    _, dry = run(["dvc", "repro", "--dry", "--force"], clone, env)
    stages = re.findall(r"Running stage '([^']+)'", dry)
    first = 0.0
    for stage in stages:
        elapsed, _ = run(["dvc", "repro", "--force", "--single-item", stage], clone, env)
        first += elapsed
        print(f"  {stage:28s} {elapsed:7.1f} s", flush=True)
    second, out2 = run(["dvc", "repro"], clone, env)
    print(f"dvc repro (fresh clone, all {len(stages)} stages): {first:7.1f} s")
    print(f"dvc repro (nothing changed)        : {second:7.1f} s   stages run: "
          f"{len(re.findall('Running stage', out2))}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("av_digits")
    runs = client.search_runs([experiment.experiment_id], max_results=1000, order_by=["start_time ASC"])
    per_kind: dict[str, list[float]] = {}
    for r in runs:
        if r.data.tags.get("run.role") != "training":
            continue
        key = f"{r.data.tags['run.stage']}/{r.data.tags['run.method']}/{r.data.tags['run.target']}"
        if "wall_time_s" in r.data.metrics:
            per_kind.setdefault(key, []).append(r.data.metrics["wall_time_s"])
    print("per-run wall time (mean over seeds, training and evaluation):")
    for key, values in per_kind.items():
        print(f"  {key:32s} {sum(values) / len(values):6.1f} s  x{len(values)}")
    total = sum(sum(v) for v in per_kind.values())
    print(f"  total in training runs: {total:.1f} s")
    if args.keep:
        print(f"kept: {clone}")
    else:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
