"""VGGSound-50k: the loader of the authors' AVEL feature layout (global min-max, streamed visual blocks, checks)
and the extraction from raw clips with random-init VGG19 and VGGish of the real architectures on the CPU."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
import torch

from pipeline.data import vggsound as loader
from pipeline.data.validation import DataError
from pipeline.extraction import vggsound as vx
from pipeline.extraction.common import ExtractRuntime, WeightsError
from tests.raw_fixtures.vggsound import (CATEGORIES, tiny_runtime, write_clip, write_feature_fixture,
                                         write_feature_layout, write_raw_fixture)

FAST = vx.VGGSoundExtractParams(frames_per_second=1)
# 8 CSV rows (2 per class): rows 0-4 decodable (one 10-s clip, four 2-s clips), 5 without audio, 6 corrupt,
# 7 missing. Short clips keep VGG19 (about 0.3 s per 224×224 frame on this CPU) cheap.
SECONDS = (10, 2, 2, 2, 2, 2, 2, 2)


def stacked(chunked) -> np.ndarray:
    return np.concatenate(list(chunked.blocks()))


# ---------------------------------------------------------------------------------------------------- loader

@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("vggs_features")
    return root, write_feature_fixture(root, n_per_class=6, classes=4, seed=0)


def small_features(tmp_path, **kwargs):
    """A 4-clip feature layout in `tmp_path` (for tests that damage it)."""
    return tmp_path, write_feature_fixture(tmp_path, n_per_class=1, classes=4, seed=1, **kwargs)


def test_loader_global_min_max_and_blocks(features):
    root, info = features
    data = loader.load(root, block_size=5)
    visual, audio = info["visual"], info["audio"]
    assert data["m1"].shape == (24, 10, 7, 7, 512)
    assert [len(block) for block in data["m1"].blocks()] == [5, 5, 5, 5, 4]
    got = stacked(data["m1"])
    assert got.dtype == np.float32 and data["m2"].dtype == np.float32 and data["m2"].shape == (24, 10, 128)
    np.testing.assert_allclose(got, (visual - visual.min()) / (visual.max() - visual.min()), atol=1e-6)
    np.testing.assert_allclose(data["m2"], (audio - audio.min()) / (audio.max() - audio.min()), atol=1e-6)
    assert got.min() == 0.0 and got.max() == 1.0
    assert data["labels"].dtype == np.int64 and data["labels"].tolist() == info["labels"].tolist()
    summary = data["summary"]
    assert summary["layout"] == {"feature_folder": ".", "segment_folder": "seg_labels"}
    assert summary["segment_foreground_fraction"] == pytest.approx(info["flags"].mean(), abs=1e-6)
    assert summary["normalisation"]["visual_min"] == pytest.approx(float(visual.min()))


def test_global_min_max_by_hand_and_idempotent(tmp_path):
    visual = np.full((2, 10, 7, 7, 512), 2.0, dtype=np.float32)
    visual[0, 0, 0, 0, 0] = -2.0
    visual[1] = 6.0                               # global min -2, max 6: 2 -> 0.5
    audio = np.full((2, 10, 128), 10.0, dtype=np.float32)
    audio[1] = 30.0
    audio[1, 9, 127] = 50.0                       # global min 10, max 50: 30 -> 0.5
    flags = np.ones((2, 10), dtype=np.int64)
    write_feature_layout(tmp_path / "a", ["va", "vb"], [3, 140], visual, audio, flags)
    data = loader.load(tmp_path / "a")
    m1 = stacked(data["m1"])
    assert m1[0, 0, 0, 0, 0] == 0.0 and m1[0, 5, 3, 3, 100] == 0.5 and (m1[1] == 1.0).all()
    assert data["m2"][0].max() == 0.0 and data["m2"][1, 0, 0] == 0.5 and data["m2"][1, 9, 127] == 1.0
    assert data["labels"].tolist() == [3, 140]
    # loading already-normalised features changes nothing (min 0 and max 1 already)
    write_feature_layout(tmp_path / "b", ["va", "vb"], [3, 140], m1, data["m2"], flags)
    again = loader.load(tmp_path / "b")
    assert np.array_equal(stacked(again["m1"]), m1) and np.array_equal(again["m2"], data["m2"])


def test_seg_label_folder_fallback_and_preference(tmp_path):
    root, info = small_features(tmp_path, seg_folder="seg_label")     # the authors' writer's folder name
    assert loader.load(root)["summary"]["layout"]["segment_folder"] == "seg_label"
    shutil.copytree(root / "seg_label", root / "seg_labels")           # the name their loader reads wins
    assert loader.load(root)["summary"]["layout"]["segment_folder"] == "seg_labels"


def test_authors_normed_feature_folder(tmp_path):
    root, info = small_features(tmp_path)
    (root / "VGGS50K_features_normed").mkdir()
    for name in ("visual_features", "audio_features"):
        shutil.move(root / name, root / "VGGS50K_features_normed" / name)
    data = loader.load(root)
    assert data["summary"]["layout"]["feature_folder"] == "VGGS50K_features_normed"
    assert len(data["m2"]) == 4


def test_missing_feature_file_named(tmp_path):
    root, info = small_features(tmp_path)
    victim = root / "audio_features" / f"{info['stems'][2]}_aFeature.npy"
    victim.unlink()
    with pytest.raises(DataError, match=str(victim)):
        loader.load(root)


def test_label_out_of_range_names_metadata_line(tmp_path):
    root, info = small_features(tmp_path)
    lines = (root / "VGGS50k_metadata.txt").read_text().splitlines()
    lines[1] = f"{info['stems'][1]}&141"
    (root / "VGGS50k_metadata.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"VGGS50k_metadata\.txt: line 2: label 141 is out of range; expected 0\.\.140"):
        loader.load(root)


def test_shape_mismatch_and_bad_segment_flags_name_the_file(tmp_path):
    root, info = small_features(tmp_path)
    bad = root / "audio_features" / f"{info['stems'][0]}_aFeature.npy"
    np.save(bad, np.zeros((10, 127), dtype=np.float32))
    with pytest.raises(DataError, match=f"{bad}: expected an array of shape \\(10, 128\\)"):
        loader.load(root)
    np.save(bad, np.zeros((10, 128), dtype=np.float32))
    flags = root / "seg_labels" / f"{info['stems'][3]}_sLabel.npy"
    np.save(flags, np.full((1, 10), 2))
    with pytest.raises(DataError, match=f"{flags}: segment labels"):
        loader.load(root)


def test_missing_metadata_named(tmp_path):
    with pytest.raises(DataError, match="VGGS50k_metadata.txt: file not found"):
        loader.load(tmp_path)


# ---------------------------------------------------------------------------------------------------- pure parts

def test_class_ids_in_order_of_first_appearance():
    assert vx.class_ids(["dog barking", "cat purring", "dog barking", "airplane flyby"]) == {
        "dog barking": 0, "cat purring": 1, "airplane flyby": 2}


def test_video_id_slicing():
    assert vx.video_id_of("v6bPsB1h3wvE_110_120_out.mp4") == "6bPsB1h3wvE"     # the authors' example name
    assert vx.video_id_of("v-_aB3dE9xYz_0_10_out.mp4") == "-_aB3dE9xYz"
    assert vx.video_id_of("6bPsB1h3wvE_000110.mp4", (0, 11)) == "6bPsB1h3wvE"


def test_frame_sampling_instants_and_choice():
    assert vx.segment_times(4)[:5] == [0.125, 0.375, 0.625, 0.875, 1.125]
    consumed = []

    def timed(n, fps):            # (time, index) at `fps`, recording how far the decoder was read
        for i in range(n):
            consumed.append(i)
            yield i / fps, i

    chosen, last = vx.frames_at(timed(24, 8), vx.segment_times(2))    # a 3-s clip at 8 fps, 2 frames/s
    assert chosen[:6] == [2, 6, 10, 14, 18, 22] and chosen[6:] == [23] * 14 and last == 2.875
    consumed.clear()
    chosen, last = vx.frames_at(timed(160, 8), vx.segment_times(1))   # a 20-s clip: stop after 10 s
    assert chosen == [4 + 8 * s for s in range(10)] and max(consumed) == 77


def test_vggish_quantisation_by_hand():
    got = vx.quantise(torch.tensor([[2.0, -3.0, 1.0, 0.5]]), torch.eye(4), torch.zeros(4))
    assert got.tolist() == [[255.0, 0.0, 191.0, 159.0]]       # clip to [-2, 2], (x + 2) * 255 / 4, rounded
    shifted = vx.quantise(torch.tensor([[1.0, 1.0]]), 2 * torch.eye(2), torch.tensor([1.0, 0.5]))
    assert shifted.tolist() == [[128.0, 191.0]]               # (0, 1) -> 127.5 -> 128 (half to even), 191.25


def test_pca_file_with_numpy_arrays_loads_safely(tmp_path):
    path = tmp_path / "pca.pth"
    torch.save({"pca_eigen_vectors": 2 * np.eye(128), "pca_means": np.arange(128.0).reshape(128, 1)}, path)
    matrix, means = vx.read_pca(path)
    assert matrix.shape == (128, 128) and float(matrix[5, 5]) == 2.0 and means.tolist() == list(range(128))
    # torchvggish's file was pickled with NumPy 1, whose arrays refer to numpy.core.multiarray
    old = tmp_path / "pca_numpy1.pth"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old, "w") as target:
        for entry in source.infolist():
            data = source.read(entry.filename)
            if entry.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(entry.filename, data)
    assert torch.equal(vx.read_pca(old)[0], matrix)


def test_short_clip_skipped_when_asked(tmp_path):
    path = tmp_path / "vAAAAAAAAAAA_0_10_out.mp4"
    write_clip(path, label=1, seconds=2)
    clip = vx.Clip("AAAAAAAAAAA", path, path.stem.split(".")[0], 1, np.ones(10, dtype=np.int64))

    def no_networks():
        raise AssertionError("a skipped clip must not build the networks")

    with pytest.raises(vx.Skip, match="shorter than 10 s"):
        vx.extract_clip(clip, vx.VGGSoundExtractParams(frames_per_second=1, short_clips="skip"), no_networks)


# ---------------------------------------------------------------------------------------------------- raw extraction

@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("vggs_raw")
    info = write_raw_fixture(base / "raw", n_per_class=2, classes=4, seconds=SECONDS, missing=1, corrupt=1,
                             no_audio=1)
    runtime = tiny_runtime(base)
    summary = vx.extract(base / "raw", base / "out", FAST, runtime)
    return base, info, runtime, summary


def kept_rows(info):
    return [i for i, (video_id, _) in enumerate(info["rows"])
            if video_id not in info["missing"] + info["corrupt"] + info["no_audio"]]


def test_extraction_metadata_classes_and_alignment(raw_run):
    base, info, _, summary = raw_run
    out = base / "out"
    classes = (out / "classes.txt").read_text().splitlines()
    assert classes == list(CATEGORIES[:4]) and classes != sorted(classes)   # first appearance, not alphabetical
    lines = (out / "VGGS50k_metadata.txt").read_text().splitlines()
    rows = kept_rows(info)
    assert lines == [f"{info['files'][i].name.removesuffix('.mp4')}&{info['labels'][i]}" for i in rows]
    stems = [line.split("&")[0] for line in lines]
    for folder, tail in (("visual_features", "_vFeature.npy"), ("audio_features", "_aFeature.npy"),
                         ("seg_labels", "_sLabel.npy")):
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(stem + tail for stem in stems)
    for i, stem in zip(rows, stems):
        assert stem[1:12] == info["rows"][i][0]
        assert np.load(out / "seg_labels" / f"{stem}_sLabel.npy").tolist() == [info["flags"][info["rows"][i][0]]]
    assert summary["items"] == 5 and summary["csv_rows"] == 8 and summary["classes"] == 4
    assert summary["missing_videos"] == 1 and summary["missing_examples"] == info["missing"]
    assert summary["skipped"]["count"] == 2
    assert summary["skipped"]["reasons"] == {"no audio track": 1, "unreadable": 1}
    assert {item["video_id"] for item in summary["skipped"]["items"]} == set(info["corrupt"] + info["no_audio"])
    assert summary["weights"] == "random_init" and "identity" in summary["extractors"]["vggish_pca"]


def test_extracted_shapes_dtypes_and_padding(raw_run):
    base, info, _, summary = raw_run
    out = base / "out"
    stems = [line.split("&")[0] for line in (out / "VGGS50k_metadata.txt").read_text().splitlines()]
    visual = [np.load(out / "visual_features" / f"{stem}_vFeature.npy") for stem in stems]
    audio = [np.load(out / "audio_features" / f"{stem}_aFeature.npy") for stem in stems]
    assert all(v.shape == (10, 7, 7, 512) and v.dtype == np.float32 for v in visual)
    assert all(a.shape == (10, 128) and a.dtype == np.float32 for a in audio)
    assert all((a == np.round(a)).all() and a.min() >= 0 and a.max() <= 255 for a in audio)   # 8-bit quantised
    full, short = visual[0], visual[1]                      # row 0 lasts 10 s, row 1 2 s
    assert not np.array_equal(full[9], full[8])             # ten real seconds (the bar moves)
    assert all(np.array_equal(short[s], short[1]) for s in range(2, 10)) and not np.array_equal(short[0], short[1])
    assert all(np.array_equal(audio[1][s], audio[1][9]) for s in range(3, 9))           # silent seconds
    assert summary["fallbacks"] == {"padded_clips": 4, "padded_visual_seconds": 32, "padded_audio_seconds": 32}
    assert (visual[0] >= 0).all()                           # pool5 follows a ReLU


def test_resume_reuses_cache_with_identical_output(raw_run):
    base, info, runtime, first = raw_run
    summary = vx.extract(base / "raw", base / "out_again", FAST, runtime)
    assert summary["cache"] == {"hits": 5, "misses": 2}     # the two skipped clips are retried, never cached
    for path in sorted((base / "out").rglob("*.npy")):
        assert np.array_equal(np.load(path), np.load(base / "out_again" / path.relative_to(base / "out")))
    metadata = [(folder / "VGGS50k_metadata.txt").read_text() for folder in (base / "out", base / "out_again")]
    assert metadata[0] == metadata[1]


def test_loader_reads_the_extraction_output(raw_run):
    base, _, _, summary = raw_run
    data = loader.load(base / "out")
    assert data["m1"].shape == (5, 10, 7, 7, 512) and data["m2"].shape == (5, 10, 128)
    assert data["summary"]["extraction"]["items"] == 5
    assert data["summary"]["class_names"] == list(CATEGORIES[:4])


def test_missing_vgg19_weights_named(raw_run, tmp_path, monkeypatch):
    base = raw_run[0]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    runtime = ExtractRuntime(weights_dir=str(tmp_path / "weights"), weights="pretrained", progress=False,
                             device="cpu", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="vgg19-dcbb9e9d.pth not found"):
        vx.extract(base / "raw", tmp_path / "out", FAST, runtime)
    assert not (tmp_path / "out").exists()


def test_bad_raw_layout_named_before_work(tmp_path):
    runtime = tiny_runtime(tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path / 'vggsound-avel50k.csv'}: file not found"):
        vx.extract(tmp_path, tmp_path / "out", FAST, runtime)
    (tmp_path / "vggsound-avel50k.csv").write_text("video_id,category,split\nAAAAAAAAAAA,dog barking,train\n")
    (tmp_path / "vggsound-avel50k_labels.json").write_text('[{"AAAAAAAAAAA": {"label": [1, 0, 1]}}]')
    with pytest.raises(DataError, match="vggsound-avel50k_labels.json: video 'AAAAAAAAAAA': label"):
        vx.extract(tmp_path, tmp_path / "out", FAST, runtime)
    (tmp_path / "vggsound-avel50k_labels.json").write_text('{"AAAAAAAAAAA": {"label": [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]}}')
    with pytest.raises(DataError, match=f"{tmp_path / 'videos'}: folder not found"):
        vx.extract(tmp_path, tmp_path / "out", FAST, runtime)
    (tmp_path / "vggsound-avel50k.csv").write_text("youtube_id,category\nAAAAAAAAAAA,dog barking\n")
    with pytest.raises(DataError, match="vggsound-avel50k.csv: no column video_id"):
        vx.extract(tmp_path, tmp_path / "out", FAST, runtime)
