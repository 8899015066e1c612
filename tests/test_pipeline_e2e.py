"""End to end: `dvc repro` of a tiny profile in a temporary clone, then the tables and MLflow runs.

The clone holds the repository's tracked files (as in the working tree), a fresh git history and no
DVC cache, like a newcomer's checkout. The tiny profile shrinks AV-Digits, seeds and epochs only.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.methods import METHODS
from pipeline.reporting.tables import TABLE1_ROWS
from tests.conftest import REPO

SEEDS = [0, 1]


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if (REPO / line).is_file()]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "CMKD_PIPELINE_KEY", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`, `dvc` of this venv
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clone")
    for name in _tracked_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["seeds"] = SEEDS
    params["av_digits"]["samples_per_class"] = 8
    params["training"]["av_digits"].update(epochs=2, batch_size=16)
    params["teacher_training"]["av_digits"].update(epochs=2, batch_size=16)
    params["mst"]["stage1_epochs"]["av_digits"] = 2
    params["mst"]["stage2_epochs"]["av_digits"] = 1
    params["fitnets"]["hint_epochs"]["av_digits"] = 1
    params["mgdfr"]["co_epochs"]["av_digits"] = 1
    params["mgdfr"]["repeat_permute"]["av_digits"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "tiny profile"], root)
    _run(["dvc", "repro"], root)
    return root


def _mlflow_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("av_digits")
    return client, client.search_runs([experiment.experiment_id], max_results=500)


def test_table1_has_every_row_for_both_targets(clone):
    rows = list(csv.DictReader((clone / "reports" / "table1.csv").open()))
    assert [r["method"] for r in rows] == [row.label for row in TABLE1_ROWS]  # every row, every cell filled
    for row in rows:
        for target in ("image", "audio"):
            assert 0.0 <= float(row[f"av_digits/{target}/mean"]) <= 100.0
            assert int(row[f"av_digits/{target}/n"]) == len(SEEDS)
    markdown = (clone / "reports" / "table1.md").read_text()
    assert "| Method | AV-Digits Image | AV-Digits Audio |" in markdown and "**" in markdown
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], clone).stdout)
    assert "reports/metrics.json" in json.dumps(metrics)


def test_table3_and_routing_figures(clone):
    rows = list(csv.DictReader((clone / "reports" / "table3.csv").open()))
    assert [r["setting"] for r in rows] == ["baseline", "a", "b", "c", "d", "e", "f", "full"]
    assert [(r["S1"], r["S2"], r["S3"]) for r in rows][0] == ("0", "0", "0")
    assert [(r["S1"], r["S2"], r["S3"]) for r in rows][-1] == ("1", "1", "1")
    for row in rows:
        assert int(row["av_digits/mean/n"]) == len(SEEDS)
        mean = (float(row["av_digits/image/mean"]) + float(row["av_digits/audio/mean"])) / 2
        assert abs(float(row["av_digits/mean/mean"]) - mean) < 1e-3
    full = rows[-1]
    table1 = {r["row_key"]: r for r in csv.DictReader((clone / "reports" / "table1.csv").open())}
    assert full["av_digits/image/mean"] == table1["mst"]["av_digits/image/mean"]
    assert "| Setting | S1 | S2 | S3 |" in (clone / "reports" / "table3.md").read_text()
    for modality in ("image", "audio"):
        png = clone / "reports" / "figures" / f"routing_av_digits_{modality}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_run_is_in_mlflow_with_params_metrics_tags_and_artifacts(clone):
    client, runs = _mlflow_runs(clone)
    children = [r for r in runs if r.data.tags.get("run.role") == "training"]
    # per seed: 3 networks alone; each method once per teacher config and target; MST stage 1 once, stages 2
    # and 3 per target; the 7 ablation settings per target plus one own stage-2 run per target
    params = yaml.safe_load((clone / "params.yaml").read_text())
    distill_runs = sum(2 * len(params[name]["teachers"]) for name, cls in METHODS.items() if cls.params_type)
    assert len(children) == len(SEEDS) * (3 + distill_runs + 1 + 2 + 2 + 7 * 2 + 2)
    names = {r.info.run_name for r in children}
    assert {"teachers/ce/none/multimodal/seed0", "distill/kd/cm/audio/seed1"} <= names
    mst_s3 = [r for r in children if r.data.tags["run.stage"] == "mst_s3"]
    assert len(mst_s3) == 2 * len(SEEDS)
    for run in mst_s3:
        assert {"route_0", "route_3", "lambda_kd", "lambda_lb", "train_lb", "train_kd"} <= set(run.data.metrics)
    for run in children:
        assert run.info.status == "FINISHED"
        if run.data.tags["run.stage"] in ("mst_s1", "mst_s2") or "/stage2/" in run.info.run_name:
            continue
        assert {"seed", "method", "teacher", "target", "train.lr", "train.epochs"} <= set(run.data.params)
        assert {"git.commit", "dvc.stage", "torch.version", "device", "mlflow.parentRunId"} <= set(run.data.tags)
        assert (run.data.tags["dvc.stage"] in ("teachers@av_digits", "mst_s3@av_digits", "mst_ablation@av_digits")
                or run.data.tags["dvc.stage"] == f"distill@av_digits-{run.data.params['method']}")
        assert "test_accuracy" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [0, 1]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "history.csv"} <= artifacts
        if run.data.tags["run.stage"] == "mst_s3":
            assert "routing.png" in artifacts
    kd_runs = [r for r in children if r.data.params["method"] == "kd"]
    assert all(r.data.params["kd.temperature"] == "4.0" for r in kd_runs)


def test_second_repro_runs_nothing(clone):
    out = _run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in out, out


def test_bad_data_stops_the_stage_with_the_file_named(clone):
    audio = clone / "data" / "av_digits" / "audio" / "train_data.npy"
    backup = audio.read_bytes()
    _, before = _mlflow_runs(clone)
    try:
        audio.write_bytes(backup[:-500])
        result = _run(["dvc", "repro", "--single-item", "prepare@av_digits"], clone, check=False)
        assert result.returncode != 0
        assert "audio/train_data.npy" in result.stderr + result.stdout
        assert "Traceback" not in result.stderr
    finally:
        audio.write_bytes(backup)
    _, after = _mlflow_runs(clone)
    assert len(after) == len(before)
    _run(["dvc", "repro"], clone)  # the failed stage removed its outputs: restore them for the next tests


def test_misspelled_param_fails_before_training(clone):
    params_path = clone / "params.yaml"
    original = params_path.read_text()
    try:
        params_path.write_text(original.replace("temperature:", "temprature:"))
        result = _run(["dvc", "repro"], clone, check=False)
        assert result.returncode != 0
        assert re.search(r"error: params\.yaml: \w+\.temprature: unknown key \(did you mean 'temperature'\?\)",
                         result.stderr), result.stderr
        assert "Traceback" not in result.stderr
    finally:
        params_path.write_text(original)
        _run(["dvc", "repro"], clone)  # the failed stage removed its outputs: restore them for the next tests


def test_topk_override_reruns_only_stage_3(clone):
    out = _run(["dvc", "exp", "run", "-S", "topk=2", "-n", "top2"], clone).stdout
    ran = re.findall(r"Running stage '([^']+)'", out)
    # the ablation's settings with stage 3 route top-k too; stages 1 and 2 and the baselines come from the cache
    assert sorted(ran) == ["mst_ablation@av_digits", "mst_s3@av_digits", "report"], out
    shown = _run(["dvc", "exp", "show", "--json"], clone).stdout
    assert "top2" in shown
    _, runs = _mlflow_runs(clone)
    top2 = [r for r in runs if r.data.tags.get("dvc.exp_name") == "top2" and r.data.tags.get("run.role") == "training"]
    assert all(r.data.params["topk"] == "2" for r in top2)
    assert len([r for r in top2 if r.data.tags["run.stage"] == "mst_s3"]) == 2 * len(SEEDS)
