"""End to end from the publishers' raw formats: RAVDESS (MP4 + WAV), VGGSound-AVEL50k (CSV + JSON + MP4 clips)
and CrisisMMD-V2 (TSVs + JPEGs) written by the test, enabled in params.yaml as a user would (`extract:` and
`datasets:`), and `dvc repro` through Table 1 at toy size in a temporary clone: extraction with randomly
initialised extractors of the real architectures, prepare (RAVDESS actor-disjoint), teachers, KD and
MST-Distill's three phases, the report.

Toy size: 24 samples per dataset, one seed, two epochs; RAVDESS face crops 16x16 (`extraction.ravdess.face_size`;
the networks follow the input size), VGGSound clips of 2 s at 1 frame per second (padded to 10 segments as the
extraction pads short clips), MaskNets at their minimum width. Every shape but those is the spec's.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.splits import read_split_column, split_positions
from tests.conftest import REPO, shrunk_raw
from tests.raw_fixtures import crisismmd as crisis_fixture, ravdess as ravdess_fixture, vggsound as vggsound_fixture
from tests.test_pipeline_e2e import _run, _tracked_files

DATASETS = ("ravdess", "vggsound50k", "crisismmd_v2")
WRITERS = {"ravdess": lambda root: ravdess_fixture.write_raw_fixture(root, n_per_class=6, classes=4, actors=(1, 2, 3)),
           "vggsound50k": lambda root: vggsound_fixture.write_raw_fixture(root, n_per_class=6, classes=4, seconds=2.0),
           "crisismmd_v2": lambda root: crisis_fixture.write_raw_fixture(root, n_per_class=6)}


def _params() -> dict:
    raw = shrunk_raw(seeds=(0,), epochs=2, batch_size=8)
    raw["datasets"] = {key: f"data/extracted/{key}" for key in DATASETS}
    raw["extract"] = {key: f"data/raw/{key}" for key in DATASETS}
    raw["studies"] = []
    raw["segmentation"]["datasets"] = {}   # Table 2 is proven by the AV-Digits/RGB-D Digits end-to-end test
    raw["methods"] = ["kd"]
    raw["splits"]["disjoint_groups"] = ["ravdess"]
    raw["tracking"]["mlflow"] = False   # MLflow is proven by the AV-Digits end-to-end test; here it costs ~3 s a stage
    extraction = raw["extraction"]
    extraction.update(weights="random_init", progress=False, batch_size=16)
    extraction["ravdess"]["face_size"] = 16
    extraction["vggsound50k"]["frames_per_second"] = 1
    for key in DATASETS:
        for block in ("training", "teacher_training"):
            # CrisisMMD's lr 5e-3 diverges on the unnormalised features of a random-init ResNet-50 (values up to
            # ~120, where the published weights give O(1)): 1e-4 keeps the toy runs finite
            raw[block][key].update(epochs=2, batch_size=8, lr=1.0e-4)
        raw["mst"]["hidden_factor"][key] = 1024.0
        raw["mst"]["collaborative_init_epochs"][key] = 2
        raw["mst"]["specialist_adaptation_epochs"][key] = 1
    return raw


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets_clone")
    for name in _tracked_files():
        if name.startswith(("results/", "reports/")) or name == "dvc.lock":
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    for key, write in WRITERS.items():
        write(root / "data" / "raw" / key)
    (root / "params.yaml").write_text(yaml.safe_dump(_params(), sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "fixture datasets"], root)
    _run(["dvc", "repro"], root)
    return root


def test_table1_has_a_column_pair_per_dataset_from_raw_files(clone):
    rows = {r["row_key"]: r for r in csv.DictReader((clone / "reports" / "table1.csv").open())}
    columns = {"ravdess": ("visual", "audio"), "vggsound50k": ("visual", "audio"), "crisismmd_v2": ("image", "text")}
    for key, modalities in columns.items():
        for modality in modalities:
            for row in ("wo_kd", "kd_mm", "kd_cm", "mst"):
                cell = rows[row][f"{key}/{modality}/mean"]
                assert cell != "" and 0.0 <= float(cell) <= 100.0, (key, modality, row)
                assert rows[row][f"{key}/{modality}/n"] == "1"
            assert rows["wo_kd"][f"{key}/{modality}/paper"] == ""   # the paper's values are not transcribed
    markdown = (clone / "reports" / "table1.md").read_text()
    assert "| Method | RAVDESS Visual | RAVDESS Audio | VGGSound-50k Visual | VGGSound-50k Audio | " \
           "CrisisMMD-V2 Image | CrisisMMD-V2 Text |" in markdown
    assert "Not transcribed yet for RAVDESS, VGGSound-50k, CrisisMMD-V2" in markdown
    for key in DATASETS:
        for figure in (f"fig7_unimodal_vs_mm_{key}.png", f"fig8_mm_vs_cm_{key}.png"):
            assert (clone / "reports" / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prepared_shapes_are_the_specs_and_extraction_is_summarised(clone):
    shapes = {"ravdess": ([15, 3, 16, 16], [15, 156]), "vggsound50k": ([10, 7, 7, 512], [10, 128]),
              "crisismmd_v2": ([2048], [768])}
    for key, (m1, m2) in shapes.items():
        summary = json.loads((clone / "data" / "prepared" / key / "summary.json").read_text())
        assert summary["shapes"] == {"m1": m1, "m2": m2}, key
        extraction = summary["extraction"]
        assert extraction["weights"] == "random_init" and extraction["items"] == summary["n_samples"] >= 16, key
        assert np.load(clone / "data" / "prepared" / key / "m1.npy", mmap_mode="r").dtype == np.float32


def test_ravdess_split_is_actor_disjoint(clone):
    prepared = clone / "data" / "prepared" / "ravdess"
    groups = np.load(prepared / "groups.npy")
    split = split_positions(read_split_column(prepared / "split_indices.csv", 0, len(groups)), 0.6, 0.2, groups)
    parts = [set(groups[getattr(split, name)].tolist()) for name in ("train", "val", "test")]
    assert parts == [parts[0], parts[1], parts[2]] and sum(map(len, parts)) == 3
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
