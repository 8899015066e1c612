"""End to end: `dvc repro` of a tiny profile in a temporary clone, then the tables, DVC's own views and the
MLflow runs.

The clone holds the repository's tracked files (as in the working tree), a fresh git history and no DVC
cache, like a newcomer's checkout. The tiny profile shrinks the real params.yaml (AV-Digits size, seeds,
epochs) and nothing else. Every stage runs under DVC, so every params key a stage reads must be listed in
dvc.yaml (an unlisted read stops the stage: pipeline/params.py, `restrict_to`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.methods import all_methods, method_class
from pipeline.reporting.tables import table1_rows
from tests.conftest import REPO, free_port, shrunk_raw

SEEDS = [0, 1]
# Table 1 through two baselines (logits and a feature tap) and MST-Distill; every other baseline's stage runs in
# test_every_other_baseline_stage_reads_only_what_dvc_yaml_lists (in process: each DVC stage costs ~12 s of
# startup here, more than its toy runs) and steps in tests/test_method_contract.py
TINY_METHODS = ["kd", "fitnets"]


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if (REPO / line).is_file()]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "CMKD_PIPELINE_KEY", "PYTHONPATH",
                        "DVC_STAGE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`, `dvc` of this venv
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def _run(args: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clone")
    for name in _tracked_files():
        if name.startswith(("results/", "reports/")) or name == "dvc.lock":
            continue  # a clone regenerates them
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    params = shrunk_raw(seeds=SEEDS, epochs=2, batch_size=16)
    params["av_digits"]["samples_per_class"] = 8
    # Table 2 through one baseline and MST-Distill; every Table 2 method steps in tests/test_segmentation_methods.py
    params["segmentation"]["methods"] = ["kd"]
    params["methods"] = TINY_METHODS
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "tiny profile"], root)
    _run(["dvc", "repro"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "results of the tiny profile"], root)
    return root


def _mlflow_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("av_digits")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def test_table1_has_every_row_for_both_targets(clone):
    rows = list(csv.DictReader((clone / "reports" / "table1.csv").open()))
    assert [r["method"] for r in rows] == [row.label for row in table1_rows()]  # every row, in the paper's order
    ran = {row.key for row in table1_rows() if row.method in ("ce", "mst", *TINY_METHODS)}
    assert all(r["av_digits/image/mean"] == "" for r in rows if r["row_key"] not in ran)
    for row in (r for r in rows if r["row_key"] in ran):
        for target in ("image", "audio"):
            assert 0.0 <= float(row[f"av_digits/{target}/mean"]) <= 100.0
            assert int(row[f"av_digits/{target}/n"]) == len(SEEDS)
    markdown = (clone / "reports" / "table1.md").read_text()
    assert "| Method | AV-Digits Image | AV-Digits Audio |" in markdown and "**" in markdown


def test_table2_has_every_segmentation_row_for_both_students_and_metrics(clone):
    from pipeline.reporting.table2 import table2_rows

    rows = list(csv.DictReader((clone / "reports" / "table2.csv").open()))
    assert [r["method"] for r in rows] == [row.label for row in table2_rows()]
    assert [r["row_key"] for r in rows] == ["wo_kd", "kd_mm", "kd_cm", "fitnets_mm", "fitnets_cm", "dml",
                                            "mgdfr_cm", "c2kd_cm", "mst"]
    ran = {"wo_kd", "kd_mm", "kd_cm", "mst"}       # the tiny profile's segmentation.methods
    assert all(r["rgbd_digits/rgb/miou/mean"] == "" for r in rows if r["row_key"] not in ran)
    for row in (r for r in rows if r["row_key"] in ran):
        for modality in ("rgb", "depth"):
            for metric in ("oa", "aa", "miou"):
                assert 0.0 <= float(row[f"rgbd_digits/{modality}/{metric}/mean"]) <= 100.0
                assert int(row[f"rgbd_digits/{modality}/{metric}/n"]) == len(SEEDS)
    markdown = (clone / "reports" / "table2.md").read_text()
    assert "| Method | RGB OA | RGB AA | RGB mIoU | Depth OA | Depth AA | Depth mIoU |" in markdown
    assert (clone / "reports" / "rgbd_digits_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_metrics_are_the_table_cells_and_fit_on_a_screen(clone):
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], clone).stdout)
    values = metrics[""]["data"]["reports/metrics.json"]["data"]["av_digits"]
    table1 = {r["row_key"]: r for r in csv.DictReader((clone / "reports" / "table1.csv").open())}
    assert values["image"]["mst"] == float(table1["mst"]["av_digits/image/mean"])
    assert values["audio"]["wo_kd"] == float(table1["wo_kd"]["av_digits/audio/mean"])
    assert values["image"]["best_baseline"] == max(float(r["av_digits/image/mean"]) for k, r in table1.items()
                                                   if k not in ("wo_kd", "mst") and r["av_digits/image/mean"])
    assert set(values["table3_mean"]) == {"baseline", "full"}
    shown = _run(["dvc", "metrics", "show", "--md"], clone).stdout
    # was one 6,500-character line; now 8 Table 1/3 cells and 6 Table 2 cells, ~460 characters
    assert max(len(line) for line in shown.splitlines()) < 500
    segmentation = metrics[""]["data"]["reports/metrics.json"]["data"]["rgbd_digits"]
    table2 = {r["row_key"]: r for r in csv.DictReader((clone / "reports" / "table2.csv").open())}
    assert segmentation["rgb"]["miou_mst"] == float(table2["mst"]["rgbd_digits/rgb/miou/mean"])
    assert segmentation["depth"]["miou_wo_kd"] == float(table2["wo_kd"]["rgbd_digits/depth/miou/mean"])


def test_table3_topk_sweep_and_routing_figures(clone):
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
    sweep = list(csv.DictReader((clone / "reports" / "plots" / "topk_av_digits.csv").open()))
    assert [r["k"] for r in sweep] == ["1", "2", "3", "4"]
    # k = 1 is the default top-k: the sweep's runs reproduce the Table 1 row exactly
    assert float(sweep[0]["image_mean"]) == float(table1["mst"]["av_digits/image/mean"])
    for png in ("routing_av_digits_image.png", "routing_av_digits_audio.png", "fig6_topk_av_digits.png"):
        assert (clone / "reports" / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_6_7_8_figures_5_7_8_and_health_report(clone):
    reports = clone / "reports"
    assert "**MST-Distill / KD**" in (reports / "table6.md").read_text()
    paired = (reports / "table1_paired.md").read_text()
    rows = [r for r in csv.DictReader((reports / "table1.csv").open()) if r["av_digits/image/mean"]]
    # every row that ran but w/o KD, both targets, with its win count over the seeds
    assert len(re.findall(rf"[+-]\d+\.\d\d ± \d+\.\d\d \(\d/{len(SEEDS)}\)", paired)) == 2 * (len(rows) - 1)
    for name, rows in (("table7.md", ("Joint (paper)", "Detached (DML-style)")), ("table8.md", ("KL (paper Eq. 17)", "CV"))):
        text = (reports / name).read_text()
        assert all(f"| {row} |" in text for row in rows), name
    health = (reports / "health.md").read_text()
    runs = [r for dataset in ("av_digits", "rgbd_digits") for path in (clone / "results" / dataset).glob("*.json")
            for r in json.loads(path.read_text())["runs"]]
    flagged = [r for r in runs if r["health"]["problems"]]
    assert f"{len(runs)} trained networks assessed, {len(flagged)} flagged" in health
    assert all(f"`{r['run_name']}`" in health for r in flagged)
    for png in ("fig5_teacher_sets_av_digits.png", "fig7_unimodal_vs_mm_av_digits.png", "fig8_mm_vs_cm_av_digits.png"):
        assert (reports / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_plots_render_offline(clone):
    out = _run([sys.executable, "-m", "pipeline.reporting.offline_plots", "--out", "dvc_plots"], clone).stdout
    assert "index.html" in out
    page = (clone / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vega-bundle.js" in page
    assert "MST-Distill routing" in page and "learning_curves_av_digits_image" in page
    assert (clone / "dvc_plots" / "vega-bundle.js").stat().st_size > 100_000


def test_every_run_is_in_mlflow_with_params_metrics_tags_and_artifacts(clone):
    client, runs = _mlflow_runs(clone)
    children = [r for r in runs if r.data.tags.get("run.role") == "training"]
    # per seed: 3 networks alone; each baseline once per teacher config and target; MST phase 1 once, phases 2 and
    # 3 per target; the 7 ablation settings per target plus one own phase-2 run per target; the top-k sweep per k
    # and target
    params = yaml.safe_load((clone / "params.yaml").read_text())
    distill_runs = sum(2 * len(params[name]["teachers"]) for name in params["methods"])
    n_specialists = 2 * params["mst"]["mask_layer_num"]
    # the method variants (Tables 7, 8, Fig. 5): detached stage 1 re-runs phases 1-3 (1 + 2 + 2), CV load
    # balancing phase 3 (2), each single-teacher set phases 2 and 3 (2 x 4)
    variants = 5 + 2 + 2 * 4
    assert len(children) == len(SEEDS) * (3 + distill_runs + 1 + 2 + 2 + 7 * 2 + 2 + 2 * n_specialists + variants)
    names = {r.info.run_name for r in children}
    assert {"teachers/ce/none/multimodal/seed0", "distill/kd/cm/audio/seed1", "mst_s1/mst/mm+cm/all/seed0",
            "mst_ablation/mst-b/mm+cm/image/seed1"} <= names
    mst_s3 = [r for r in children if r.data.tags["run.stage"] == "mst_s3"]
    assert len(mst_s3) == 2 * len(SEEDS)
    for run in mst_s3:
        assert {"dynamic_distillation/route_0", "dynamic_distillation/route_3", "dynamic_distillation/lambda_kd",
                "dynamic_distillation/train_lb", "test_accuracy"} <= set(run.data.metrics)
    for run in children:
        assert run.info.status == "FINISHED"
        tags, phase = run.data.tags, run.data.tags["run.phase"]
        assert {"seed", "method", "teacher", "target", "phase", "train.lr", "train.epochs"} <= set(run.data.params)
        assert {"git.commit", "dvc.stage", "torch.version", "device", "mlflow.parentRunId"} <= set(tags)
        stage = f"{tags['run.stage']}@av_digits"
        assert tags["dvc.stage"] == (f"distill@av_digits-{run.data.params['method']}"
                                     if tags["run.stage"] == "distill" else stage)
        key = {"collaborative_init": "val_mm_loss", "specialist_adaptation": "val_score"}.get(phase, "val_loss")
        history = client.get_metric_history(run.info.run_id, f"{phase}/{key}")
        assert history and [m.step for m in history] == list(range(len(history)))  # one value per epoch
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "history.csv" in artifacts
        if phase != "specialist_adaptation":
            assert any(a.startswith("confusion_matrix") for a in artifacts)
        if tags["run.stage"] == "mst_s3":
            assert "routing.png" in artifacts
        if tags["run.method"] == "fitnets":
            assert "history_hint.csv" in artifacts and "hint/val_hint" in run.data.metrics
    # no metric is logged twice at one step, in any run (one query over the store)
    import sqlite3
    with sqlite3.connect(clone / "mlflow.db") as db:
        repeated = db.execute("SELECT run_uuid, key, step, COUNT(*) FROM metrics GROUP BY run_uuid, key, step "
                              "HAVING COUNT(*) > 1").fetchall()
    assert not repeated
    kd_runs = [r for r in children if r.data.params["method"] == "kd"]
    assert all(r.data.params["kd.temperature"] == "4.0" and r.data.params["kd.alpha.initial"] == "0.5"
               for r in kd_runs)
    mst_s1 = next(r for r in children if r.data.tags["run.stage"] == "mst_s1")
    assert "mst.lb_mode" not in mst_s1.data.params  # a stage logs the params it depends on, nothing else


def test_second_repro_runs_nothing_and_status_is_clean(clone):
    out = _run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in out, out
    status = _run(["dvc", "status"], clone).stdout
    assert "up to date" in status.lower() or not status.strip(), status


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
    _run(["dvc", "checkout", "prepare@av_digits"], clone)  # the failed stage removed its outputs: back from the cache


@contextlib.contextmanager
def _kept(path: Path):
    """`path` as it was before the block (its bytes are yielded), put back after it: a file the block corrupts, or
    a stage's uncached output that a failing attempt deleted (restoring it is exactly the state before, without
    training the stage again)."""
    backup = path.read_bytes()
    try:
        yield backup
    finally:
        path.write_bytes(backup)


def test_corrupt_teacher_checkpoint_fails_before_any_run(clone):
    """A stage validates every checkpoint it will load before training anything, with one line and no
    advice to unpickle."""
    checkpoint = clone / "models" / "av_digits" / "teachers" / "seed1" / "m2.pt"
    _, before = _mlflow_runs(clone)
    # DVC deletes kd.json before running the stage
    with _kept(clone / "results" / "av_digits" / "kd.json"), _kept(checkpoint) as backup:
        checkpoint.write_bytes(backup[: len(backup) // 2])
        result = _run(["dvc", "repro", "--single-item", "--force", "distill@av_digits-kd"], clone, check=False)
        assert result.returncode != 0
        assert "seed1/m2.pt" in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "weights_only=False" not in result.stderr
    _, after = _mlflow_runs(clone)
    assert len([r for r in after if r.data.tags.get("run.role") == "training"]) == \
        len([r for r in before if r.data.tags.get("run.role") == "training"])
    assert "Running stage" not in _run(["dvc", "repro"], clone).stdout


def test_misspelled_param_fails_before_training(clone):
    params_path = clone / "params.yaml"
    # DVC deletes kd.json before running the stage
    with _kept(clone / "results" / "av_digits" / "kd.json"), _kept(params_path) as original:
        params_path.write_text(original.decode().replace("temperature:", "temprature:"))
        result = _run(["dvc", "repro", "--single-item", "distill@av_digits-kd"], clone, check=False)
        assert result.returncode != 0
        assert re.search(r"error: params\.yaml: \w+\.temprature: unknown key \(did you mean 'temperature'\?\)",
                         result.stderr), result.stderr
        assert "Traceback" not in result.stderr
    assert "Running stage" not in _run(["dvc", "repro"], clone).stdout


def test_every_other_baseline_stage_reads_only_what_dvc_yaml_lists(clone, tmp_path, monkeypatch):
    """Each baseline of the real params.yaml that the tiny profile leaves out of `dvc repro`, run as its DVC
    stage would be (its `distill@av_digits-<method>` entry's params restriction, the clone's teachers and data)
    but in this process with MLflow off and one seed: a key its dvc.yaml entry does not list would stop it. Its
    records cover every teacher configuration and both targets."""
    import stages.distill

    real = yaml.safe_load((REPO / "params.yaml").read_text())
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["workers"] = 1
    params["tracking"]["mlflow"] = False
    params["seeds"] = SEEDS[:1]   # what is checked here does not depend on the seed
    others = [m for m in real["methods"] if m not in TINY_METHODS]
    assert others
    monkeypatch.chdir(clone)
    monkeypatch.setenv("DVC_ROOT", str(clone))
    with _kept(clone / "params.yaml"):
        for method in others:
            params["methods"] = [*TINY_METHODS, method]   # its matrix entry exists only for a listed method
            (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            monkeypatch.setenv("DVC_STAGE", f"distill@av_digits-{method}")
            results = tmp_path / f"{method}.json"
            monkeypatch.setattr(sys, "argv", ["distill", "--method", method, "--dataset", "av_digits", "--prepared",
                                              "data/prepared/av_digits", "--teachers", "models/av_digits/teachers",
                                              "--results", str(results)])
            stages.distill.main()
            runs = json.loads(results.read_text())["runs"]
            configs = real[method].get("teachers") or method_class(method).teacher_configs
            assert len(runs) == 2 * len(configs), method
            assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["method"] == method for r in runs), method
    assert not _run(["git", "status", "--porcelain"], clone).stdout.strip()


def _without_cost(results: dict) -> list[dict]:
    return [{k: v for k, v in run.items() if k != "cost"} for run in results["runs"]]


def _stage_workers(root_pid: int, marker: str) -> list:
    """The worker processes of the stage under `root_pid` (`dvc repro`) whose command line holds `marker`:
    forked, they share the stage's command line and are its children. The stage's own parent may hold it too
    (DVC runs the command through a shell, which need not exec it), so a worker is a child of a *Python*
    process holding it. Only descendants count: another test file may run the same stage beside this one."""
    import psutil

    procs = {p.pid: p for p in psutil.Process(root_pid).children(recursive=True)
             if marker in " ".join(p.cmdline())}
    return [p for p in procs.values() if p.ppid() in procs and "python" in procs[p.ppid()].name()]


def test_a_killed_worker_fails_the_stage_fast_and_the_next_repro_trains_only_the_rest(clone):
    """kill -9 of one worker mid-stage: the stage fails within 60 s naming the run and the signal; `dvc repro`
    then trains only the runs that had not finished, its outputs equal the uninterrupted run's, and MLflow shows
    the final runs only, none RUNNING."""
    from mlflow.entities import ViewType

    stage = "distill@av_digits-kd"
    reference = json.loads((clone / "results" / "av_digits" / "kd.json").read_text())
    n = len(reference["runs"])
    cache = clone / ".run_cache" / stage
    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", stage], cwd=clone, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(cache.glob("*/*/done")):
            assert proc.poll() is None and time.monotonic() < deadline, "the stage ended before a run finished"
            time.sleep(0.05)
        (victim, *_) = _stage_workers(proc.pid, "stages.distill")
        victim.kill()
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and time.monotonic() - killed < 60, out
    assert re.search(rf"error: run distill/kd/\S+/seed\d: its worker process \(pid {victim.pid}\) killed by SIGKILL "
                     r"\(signal 9\)", out), out
    assert "Traceback" not in out
    finished = len(list(cache.glob("*/*/done")))
    assert 1 <= finished < n
    out = _run(["dvc", "repro"], clone).stdout
    assert f"{stage}: {finished} of {n} runs finished in an interrupted attempt" in out, out
    assert len(re.findall(r"^\[\d+/\d+\] distill/kd/", out, re.M)) == n - finished, out
    assert _without_cost(json.loads((clone / "results" / "av_digits" / "kd.json").read_text())) == \
        _without_cost(reference)
    assert not cache.exists()   # forgotten once the stage completed
    client, active = _mlflow_runs(clone)
    experiment = client.get_experiment_by_name("av_digits").experiment_id
    every = client.search_runs([experiment], run_view_type=ViewType.ALL, max_results=5000)
    assert not [r.info.run_name for r in every if r.info.status == "RUNNING"]
    # the runs of this pipeline invocation (same commit and params: one parent run; the first repro of the clone
    # ran at another commit and keeps its own runs)
    parent = next(r for r in active if r.data.tags.get("pipeline.resumed") == "true").data.tags["mlflow.parentRunId"]
    shown = [r for r in active if r.data.tags.get("dvc.stage") == stage and r.data.tags.get("run.role") == "training"
             and r.data.tags["mlflow.parentRunId"] == parent]
    assert sorted(r.info.run_name for r in shown) == sorted(run["run_name"] for run in reference["runs"])
    assert len([r for r in shown if r.data.tags.get("pipeline.resumed") == "true"]) == finished
    for run in shown:   # replayed runs carry their real training time, not the replay's milliseconds
        assert run.info.end_time - run.info.start_time >= 1000 * float(run.data.metrics["wall_time_s"]) - 1
    superseded = [r for r in every if r.data.tags.get("pipeline.superseded") == "true"
                  and r.data.tags.get("dvc.stage") == stage]
    assert len(superseded) >= finished and all(r.info.lifecycle_stage == "deleted" for r in superseded)


@contextlib.contextmanager
def _ray_cluster():
    """A Ray cluster started as a user starts one (`ray start --head`), every server on 127.0.0.1, stopped (its
    whole process group) after the block; yields the environment a `dvc repro` needs to use it."""
    port = free_port()
    env = {**_env(), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in head.stdout:   # the head prints this once its servers listen
            lines.append(line)
            if "Ray runtime started" in line:
                break
        assert head.poll() is None, "".join(lines)
        # keep reading what the head prints, so that a full pipe never blocks it
        threading.Thread(target=head.stdout.read, daemon=True).start()
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


# the stage scripts that train (and so hand their runs to the executor); every other stage has no executor
TRAINING_MODULES = ("stages.teachers", "stages.distill", "stages.mst")


def _training_stages(root: Path) -> list[tuple[str, str, list[str]]]:
    """(stage, module, arguments) of every training stage of the clone's pipeline, read from dvc.lock (the
    commands DVC ran) in its order, which is the pipeline's: each stage after the ones it reads."""
    found = []
    for name, entry in yaml.safe_load((root / "dvc.lock").read_text())["stages"].items():
        _, _, module, *args = shlex.split(entry["cmd"])
        if module in TRAINING_MODULES:
            found.append((name, module, args))
    return found


def _outputs(root: Path, stages: list[str]) -> dict[Path, bytes]:
    """Every file under the outputs dvc.lock lists for `stages`, with its bytes."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    found = {}
    for stage in stages:
        for out in lock[stage]["outs"]:
            path = root / out["path"]
            for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
                found[file] = file.read_bytes()
    return found


def test_the_ray_executor_runs_the_tiny_pipeline_with_the_local_executor_s_results(clone, monkeypatch):
    """`executor.kind: ray` on a Ray cluster started with `ray start --head` and reached through RAY_ADDRESS
    (token authentication on, as Ray 2.60 starts clusters; its workers start in another folder, so the stage's
    relative paths must follow):

    - every training stage of the tiny pipeline (teachers, both baselines, MST-Distill's three phases and its
      studies, and the segmentation stages), run as DVC runs it (its dvc.lock command, its params restriction)
      but in this process, with MLflow off: one Ray job for all of them, whose workers stay up from stage to
      stage (each `dvc repro` stage is a new job whose workers start afresh, ~30 s a stage here). Every record
      equals the local executor's and every checkpoint, MaskNet and figure is byte-identical (DVC then finds
      nothing to re-run);
    - MST-Distill's phase 3 under `dvc repro` itself (the dataset shipped once, phase-1 checkpoints and phase-2
      MaskNets read by path in every task): its records equal the local executor's and nothing downstream goes
      stale but the report; the executor is no stage param, so DVC sees nothing to re-run until forced.

    A private Ray instance per stage (`ray_address: local`, the default) and a dead Ray worker are in
    tests/test_ray_executor.py."""
    import importlib

    training = _training_stages(clone)
    assert {module for _, module, _ in training} == set(TRAINING_MODULES)
    assert len(training) == 14, [name for name, _, _ in training]
    local = _outputs(clone, [name for name, _, _ in training])
    params_path = clone / "params.yaml"
    with _kept(params_path) as original, _ray_cluster() as env:
        params = yaml.safe_load(original)
        params["executor"]["kind"] = "ray"
        mlflow = params["tracking"]["mlflow"]
        params["tracking"]["mlflow"] = False
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        monkeypatch.chdir(clone)
        monkeypatch.setenv("DVC_ROOT", str(clone))
        for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"):
            monkeypatch.setenv(key, env[key])
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is left to the executor (a loopback cluster needs it set before Ray is
        # imported), hence no `import ray` here before the stages ran
        try:
            for name, module, args in training:
                monkeypatch.setenv("DVC_STAGE", name)
                monkeypatch.setattr(sys, "argv", [module, *args])
                importlib.import_module(module).main()
            # the cluster ran them, not a private instance
            assert sys.modules["ray"].get_runtime_context().gcs_address == env["RAY_ADDRESS"]
        finally:
            if "ray" in sys.modules:
                sys.modules["ray"].shutdown()
        monkeypatch.delenv("DVC_STAGE")
        rayed = _outputs(clone, [name for name, _, _ in training])
        assert sorted(rayed) == sorted(local)
        for path, before in local.items():
            if path.suffix == ".json" and path.parent.parent.name == "results":   # each run's cost differs
                assert _without_cost(json.loads(rayed[path])) == _without_cost(json.loads(before)), path
                path.write_bytes(before)
            else:
                assert rayed[path] == before, path
        monkeypatch.chdir(REPO)

        ray_stage, results = "mst_s3@av_digits", clone / "results" / "av_digits" / "mst.json"
        params["tracking"]["mlflow"] = mlflow
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert "Running stage" not in _run(["dvc", "repro"], clone, env=env).stdout
        out = _run(["dvc", "repro", "--force", "--single-item", ray_stage], clone, env=env).stdout
        assert out.count("Running stage") == 1, out
        assert _without_cost(json.loads(results.read_text())) == _without_cost(json.loads(local[results]))
    # nothing downstream is stale but the report (the results files hold each run's cost)
    assert re.findall(r"Running stage '([^']+)'", _run(["dvc", "repro"], clone).stdout) == ["report"]


def test_topk_override_reruns_only_stage_3(clone):
    """`dvc exp run -S topk=2` of phase 3 reuses phases 1 and 2; of the other stages only those that route top-k
    too (the ablation's settings, the method variants) and the report go stale; the sweep and the baselines stay
    valid. (Phase 3 alone is run: the stale stages are read from `dvc status`, which costs no training.)"""
    out = _run(["dvc", "exp", "run", "-S", "topk=2", "-n", "top2", "mst_s3@av_digits"], clone).stdout
    ran = re.findall(r"Running stage '([^']+)'", out)
    assert ran == ["mst_s3@av_digits"], out
    stale = json.loads(_run(["dvc", "status", "--json"], clone).stdout)
    assert sorted(stale) == ["mst_ablation@av_digits", "mst_s3_seg@rgbd_digits", "mst_variants@av_digits",
                             "report"], stale
    shown = _run(["dvc", "exp", "show", "--json"], clone).stdout
    assert "top2" in shown
    _, runs = _mlflow_runs(clone)
    top2 = [r for r in runs if r.data.tags.get("dvc.exp_name") == "top2" and r.data.tags.get("run.role") == "training"]
    assert all(r.data.params["mst.topk"] == "2" for r in top2 if r.data.params["phase"] == "dynamic_distillation")
    assert len([r for r in top2 if r.data.tags["run.stage"] == "mst_s3"]) == 2 * len(SEEDS) == len(top2)


def test_registry_and_stages_agree():
    """Every baseline of the registry is in the distill matrix and every Table 1 row is a registered method."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert sorted(params["methods"]) == sorted(c.name for c in all_methods() if c.name not in ("ce", "mst"))
    assert all(method_class(row.method) for row in table1_rows())
