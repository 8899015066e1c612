"""Bad input stops a stage before any run trains, with one line naming the file, key or value."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline.data.catalog import dataset_spec
from pipeline.io import OutputError, check_writable
from pipeline.orchestration.distill import distill
from pipeline.tracking.recording import RecordingTracker
from pipeline.orchestration.runs import LoadedDataset
from pipeline.orchestration.teachers import train_teachers
from pipeline.training.checkpoints import CheckpointError
from tests.conftest import REPO, shrunk_params, synthetic_dataset, synthetic_split


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Teachers-stage checkpoints of one seed on the synthetic data."""
    folder = tmp_path_factory.mktemp("teachers")
    params = shrunk_params(seeds=(0,), epochs=1, workers=1)
    loaded = LoadedDataset(dataset_spec("av_digits"), synthetic_dataset(), {0: synthetic_split()})
    train_teachers(params, loaded, folder, RecordingTracker())
    return params, loaded, folder


def test_an_unwritable_output_folder_is_named_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=f"{blocker}/results: cannot write the stage's outputs here"):
        check_writable(blocker / "results" / "kd.json")
    check_writable(tmp_path / "new" / "folder")  # created when missing
    assert (tmp_path / "new" / "folder").is_dir()


@pytest.mark.parametrize("damage", ["truncate", "delete", "wrong_arch"])
def test_a_bad_teacher_checkpoint_stops_distill_before_any_run(teachers, damage, tmp_path):
    params, loaded, folder = teachers
    broken = tmp_path / "teachers"
    for path in folder.rglob("*.pt"):
        target = broken / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    bad = broken / "seed0" / "m2.pt"
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:300])
    elif damage == "delete":
        bad.unlink()
    else:
        bad.write_bytes((broken / "seed0" / "m1.pt").read_bytes())
    tracker = RecordingTracker()
    with pytest.raises(CheckpointError) as info:
        distill(params, "kd", loaded, broken, tracker)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message and "weights_only=False" not in message
    assert tracker.runs == []  # nothing trained, nothing logged


def test_stage_scripts_report_expected_errors_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("lr: 0.001", "lr: 1e-3", 1))
    result = subprocess.run([sys.executable, "-m", "stages.teachers", "--params", str(params), "--dataset", "av_digits",
                             "--prepared", str(tmp_path / "prepared"), "--models", str(tmp_path / "models"),
                             "--results", str(tmp_path / "teachers.json")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "training.av_digits.lr" in lines[0] and "1.0e-3" in lines[0], result.stderr
    assert not (tmp_path / "models").exists()


def test_cuda_without_a_gpu_names_the_key(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `device: cuda` is valid here")
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("device: auto", "device: cuda", 1))
    result = subprocess.run([sys.executable, "-m", "stages.teachers", "--params", str(params), "--dataset", "av_digits",
                             "--prepared", str(tmp_path / "prepared"), "--models", str(tmp_path / "models"),
                             "--results", str(tmp_path / "teachers.json")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "device: 'cuda' requested but CUDA is not available" in result.stderr and "device: auto" in result.stderr
