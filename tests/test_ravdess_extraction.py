"""RAVDESS extraction and loader: the authors' frame window, label codes and MFCC shape pinned by hand; the
extraction of a tiny publisher-format set (real face, MTCNN) → the authors' array layout; bad clips skipped or
fallen back without shifting the pairing; resumption from the cache; the loader's per-channel normalisation."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import ravdess as loader
from pipeline.data.validation import DataError
from pipeline.extraction import ravdess as rv
from tests.raw_fixtures.ravdess import tiny_runtime, write_preprocessed_fixture, write_raw_fixture

AUTHORS = rv.RavdessExtractParams()
ALIGNED = rv.RavdessExtractParams(windowing="aligned")


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """The 24-clip fixture (3 actors × 4 emotions × 2 takes), extracted once with the authors' settings."""
    base = tmp_path_factory.mktemp("ravdess_standard")
    info = write_raw_fixture(base / "raw")
    runtime = tiny_runtime(base)
    with _one_thread():
        summary = rv.extract(base / "raw", base / "out", AUTHORS, runtime)
    return {"base": base, "info": info, "summary": summary, "runtime": runtime, "out": base / "out"}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """4 good clips plus a no-face clip, a corrupt MP4, a corrupt WAV and a 60-frame clip, extracted once."""
    base = tmp_path_factory.mktemp("ravdess_bad")
    info = write_raw_fixture(base / "raw", n_per_class=1, actors=(1,), no_face=True, corrupt=True,
                             corrupt_wav=True, short_frames=60)
    with _one_thread():
        summary = rv.extract(base / "raw", base / "out", AUTHORS, tiny_runtime(base))
    return {"base": base, "info": info, "summary": summary, "out": base / "out"}


# --- the authors' quirks, pinned by hand ---------------------------------------------------------------------

def test_frame_indices_are_the_authors_fifteen_of_108():
    assert rv.frame_indices() == [3, 10, 17, 24, 31, 39, 46, 53, 60, 67, 75, 82, 89, 96, 103]


def test_window_skip_never_fires_for_the_authors_and_centres_when_aligned():
    assert rv.window_skip(150, "authors") == 0
    assert rv.window_skip(150, "aligned") == 21          # (150 − 108) // 2
    assert rv.window_skip(108, "aligned") == 0
    assert rv.window_skip(60, "aligned") == 0


def test_audio_crop_starts():
    # 5 s at 22 050 Hz = 110 250 samples: centre crop starts at (110250 − 79380) // 2 = 15435 = 21 frames × 735
    assert rv.audio_start(110_250, "authors") == 15_435
    assert rv.audio_start(110_250, "aligned", skip_frames=21) == 15_435
    assert rv.audio_start(80_000, "aligned", skip_frames=21) == 620      # clamped: 80000 − 79380
    assert rv.audio_start(50_000, "authors") == 0
    padded = rv.fit_audio(np.ones(50_000, dtype=np.float32), 0)
    assert padded.shape == (79_380,) and padded[:50_000].all() and not padded[50_000:].any()


def test_pcm16_round_trip_quantises_to_int16_steps():
    wave = np.linspace(-0.5, 0.5, 1001, dtype=np.float32)
    restored = rv.pcm16_round_trip(wave)
    assert restored.shape == wave.shape and restored.dtype == np.float32
    steps = restored * 32768
    assert np.array_equal(steps, np.round(steps))          # whole int16 steps
    assert np.abs(restored - wave).max() <= 1 / 32768


def test_mfcc_of_a_clip_is_15_by_156(standard):
    wav = standard["info"]["root"] / "Audio_Speech" / "Actor_01" / "03-01-01-01-01-01-01.wav"
    mfcc = rv.audio_mfcc(wav, "authors")
    assert mfcc.shape == (15, 156) and mfcc.dtype == np.float32


def test_label_is_emotion_minus_one_and_order_is_actor_then_name(tmp_path):
    for rel in ("Speech/Actor_02/01-01-08-01-01-01-02.mp4", "Speech/Actor_01/01-01-05-01-02-01-01.mp4",
                "Speech/Actor_01/01-01-01-01-01-01-01.mp4", "Speech/Actor_01/02-01-01-01-01-01-01.mp4",
                "Audio_Speech/Actor_02/03-01-08-01-01-01-02.wav", "Audio_Speech/Actor_01/03-01-05-01-02-01-01.wav",
                "Audio_Speech/Actor_01/03-01-01-01-01-01-01.wav"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    clips = rv.find_clips(tmp_path)         # the video-only 02-… file is ignored
    assert [c.stem for c in clips] == ["01-01-01-01-01-01-01", "01-01-05-01-02-01-01", "01-01-08-01-01-01-02"]
    assert [c.label for c in clips] == [0, 4, 7]
    assert [c.actor for c in clips] == [1, 1, 2]
    assert clips[2].audio == tmp_path / "Audio_Speech/Actor_02/03-01-08-01-01-01-02.wav"


@pytest.mark.parametrize("name, expected", [("01-01-09-01-01-01-01.mp4", "emotion field 09"),
                                            ("01-01-00-01-01-01-01.mp4", "emotion field 00"),
                                            ("01-02-03-01-01-01-01.mp4", "expected 01-01"),
                                            ("clip_one.mp4", "not a RAVDESS code")])
def test_malformed_names_are_data_errors_naming_the_file(tmp_path, name, expected):
    path = tmp_path / "Speech" / "Actor_01" / name
    path.parent.mkdir(parents=True)
    path.touch()
    (tmp_path / "Audio_Speech" / "Actor_01").mkdir(parents=True)
    with pytest.raises(DataError, match=expected) as err:
        rv.find_clips(tmp_path)
    assert str(path) in str(err.value)


# --- extraction on the standard fixture ----------------------------------------------------------------------

def test_extraction_writes_the_authors_layout(standard):
    out, info, n = standard["out"], standard["info"], 24
    video = np.load(out / "video_data.npy", mmap_mode="r")
    audio, labels, actors = (np.load(out / f"{name}.npy") for name in ("audio_data", "label_data", "actor_data"))
    assert video.shape == (n, 15, 3, 224, 224) and video.dtype == np.uint8
    assert audio.shape == (n, 15, 156) and audio.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == info["labels"]
    assert actors.dtype == np.int64 and actors.tolist() == info["actors"] == [1] * 8 + [2] * 8 + [3] * 8
    assert (out / "clips.txt").read_text().split() == info["clips"]
    assert sorted(set(labels.tolist())) == [0, 2, 4, 7]        # emotions 01, 03, 05, 08
    summary = standard["summary"]
    assert json.loads((out / "extraction.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["items"] == n and summary["skipped"]["count"] == 0 and summary["weights"] == "random_init"
    assert summary["shapes"]["video_data"] == [n, 15, 3, 224, 224]
    assert summary["class_counts"] == [6, 0, 6, 0, 6, 0, 0, 6]


def test_a_face_is_detected_in_every_frame_of_the_normal_clips(standard):
    summary = standard["summary"]
    assert summary["fallbacks"]["clips"] == 0 and summary["fallbacks"]["frames"] == 0
    assert summary["reused_previous_box_frames"] == 0 and summary["padded"]["frames"] == 0
    # the crop is the face, not the centre square: compare with the centre crop of the same frame (index 3)
    clip = standard["info"]["clips"][0]
    frame = _frame(standard["info"]["root"] / "Speech" / "Actor_01" / f"{clip}.mp4", 3)
    video = np.load(standard["out"] / "video_data.npy", mmap_mode="r")
    assert np.abs(video[0, 0].transpose(1, 2, 0).astype(float) - _centre_crop(frame)).mean() > 20


def test_resumed_extraction_reuses_the_cache_and_gives_identical_arrays(standard):
    again = standard["base"] / "out_again"
    summary = rv.extract(standard["info"]["root"], again, AUTHORS, standard["runtime"])
    assert summary["cache"] == {"hits": 24, "misses": 0}
    for name in ("video_data", "audio_data", "label_data", "actor_data"):
        assert np.array_equal(np.load(again / f"{name}.npy"), np.load(standard["out"] / f"{name}.npy")), name
    assert (again / "clips.txt").read_text() == (standard["out"] / "clips.txt").read_text()


def test_loader_reads_the_extraction_output(standard):
    data = loader.load(standard["out"], clips_per_block=10)
    assert data["m1"].shape == (24, 15, 3, 224, 224)
    blocks = list(data["m1"].blocks())
    assert [len(b) for b in blocks] == [10, 10, 4] and all(b.dtype == np.float32 for b in blocks)
    video = np.concatenate(blocks)
    assert np.allclose(video.min(axis=(0, 1, 3, 4)), 0) and np.allclose(video.max(axis=(0, 1, 3, 4)), 1)
    assert data["m2"].shape == (24, 15, 156) and data["m2"].dtype == np.float32
    assert np.allclose(data["m2"].reshape(24, -1).min(axis=1), 0) and np.allclose(data["m2"].reshape(24, -1).max(1), 1)
    assert data["labels"].tolist() == standard["info"]["labels"]
    assert data["groups"].tolist() == standard["info"]["actors"]
    assert data["summary"]["n_clips"] == 24 and data["summary"]["extraction"]["items"] == 24


# --- bad clips -------------------------------------------------------------------------------------------------

def test_bad_clips_are_skipped_in_both_modalities_and_pairing_holds(bad):
    info, summary, out = bad["info"], bad["summary"], bad["out"]
    assert summary["clips_found"] == 8 and summary["items"] == 6
    assert sorted(s["clip"] for s in summary["skipped"]["clips"]) == sorted([info["corrupt"], info["corrupt_wav"]])
    assert any(".wav" in s["reason"] for s in summary["skipped"]["clips"])
    kept = [stem for stem in info["clips"] if stem not in (info["corrupt"], info["corrupt_wav"])]
    stems = (out / "clips.txt").read_text().split()
    assert stems == kept
    labels = np.load(out / "label_data.npy")
    assert labels.tolist() == [int(stem.split("-")[2]) - 1 for stem in stems]
    assert len(np.load(out / "audio_data.npy")) == len(np.load(out / "video_data.npy", mmap_mode="r")) == 6


def test_no_face_clip_falls_back_to_the_centre_square(bad):
    info, summary = bad["info"], bad["summary"]
    assert summary["fallbacks"] == {"clips": 1, "frames": 15, "centre_crop_clips": 1, "names": [info["no_face"]]}
    row = (bad["out"] / "clips.txt").read_text().split().index(info["no_face"])
    frame = _frame(info["root"] / "Speech" / "Actor_01" / f"{info['no_face']}.mp4", 3)
    video = np.load(bad["out"] / "video_data.npy", mmap_mode="r")
    assert np.array_equal(video[row, 0].transpose(1, 2, 0), _centre_crop(frame))


def test_short_clip_is_padded_with_black_frames(bad):
    # 60 frames hold the first 8 indices (3 … 53); the other 7 are black
    assert bad["summary"]["padded"] == {"clips": 1, "frames": 7}
    row = (bad["out"] / "clips.txt").read_text().split().index(bad["info"]["short"])
    video = np.load(bad["out"] / "video_data.npy", mmap_mode="r")
    assert video[row, :8].reshape(8, -1).max(axis=1).min() > 0 and not video[row, 8:].any()


def test_missing_wav_is_a_data_error_naming_it_before_any_work(tmp_path):
    info = write_raw_fixture(tmp_path / "raw", n_per_class=1, actors=(1,), frames=4)
    wav = tmp_path / "raw" / "Audio_Speech" / "Actor_01" / f"03{info['clips'][1][2:]}.wav"
    wav.unlink()
    with pytest.raises(DataError, match="file not found") as err:
        rv.extract(tmp_path / "raw", tmp_path / "out", AUTHORS, tiny_runtime(tmp_path))
    assert str(wav) in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_missing_mp4_and_missing_folder_are_data_errors(tmp_path):
    info = write_raw_fixture(tmp_path / "raw", n_per_class=1, actors=(1,), frames=4)
    mp4 = tmp_path / "raw" / "Speech" / "Actor_01" / f"{info['clips'][0]}.mp4"
    mp4.unlink()
    with pytest.raises(DataError, match="file not found") as err:
        rv.find_clips(tmp_path / "raw")
    assert str(mp4) in str(err.value)
    shutil.rmtree(tmp_path / "raw" / "Speech")
    with pytest.raises(DataError, match="folder not found") as err:
        rv.find_clips(tmp_path / "raw")
    assert str(tmp_path / "raw" / "Speech") in str(err.value)


# --- windowing and weights --------------------------------------------------------------------------------------

def test_aligned_windowing_takes_later_frames_of_a_long_clip(tmp_path):
    # one 150-frame clip (5 s): aligned frames start 21 frames later, where the picture is brighter; the audio
    # window is the same (both centred on equal-length media). No weight file is needed even for `pretrained`.
    write_raw_fixture(tmp_path / "raw", n_per_class=1, classes=1, actors=(1,), frames=150)
    runtime = tiny_runtime(tmp_path)
    pretrained = type(runtime)(weights="pretrained", weights_dir=str(tmp_path / "no_weights"), progress=False,
                               device="cpu", cache_dir=runtime.cache_dir)
    assert rv.WEIGHTS == ()
    authors = rv.extract(tmp_path / "raw", tmp_path / "authors", AUTHORS, pretrained)
    aligned = rv.extract(tmp_path / "raw", tmp_path / "aligned", ALIGNED, runtime)
    assert authors["weights"] == "pretrained" and aligned["cache"] == {"hits": 0, "misses": 1}
    video_a, video_b = (np.load(tmp_path / name / "video_data.npy").astype(float) for name in ("authors", "aligned"))
    assert not np.array_equal(video_a, video_b) and video_b.mean() > video_a.mean()
    audio_a, audio_b = (np.load(tmp_path / name / "audio_data.npy") for name in ("authors", "aligned"))
    assert np.array_equal(audio_a, audio_b)


# --- the loader on the authors' preprocessed layout -------------------------------------------------------------

def test_loader_normalises_video_per_channel_over_the_dataset(tmp_path):
    video = np.zeros((2, 15, 3, 224, 224), dtype=np.uint8)
    video[:, :, 0] = 10
    video[1, 3, 0, 5, 5] = 30          # channel 0: min 10, max 30 → (x − 10) / 20
    video[0, :, 1] = 255
    video[1, 0, 1, 0, 0] = 51          # channel 1: min 0, max 255 → 51 / 255 = 0.2
    video[:, :, 2] = 7                 # constant channel → 0
    arrays = write_preprocessed_fixture(tmp_path, n=2)
    np.save(tmp_path / "video_data.npy", video)
    data = loader.load(tmp_path, clips_per_block=1)
    blocks = list(data["m1"].blocks())
    assert [b.shape for b in blocks] == [(1, 15, 3, 224, 224)] * 2
    out = np.concatenate(blocks)
    assert out[0, 0, 0, 0, 0] == 0.0 and out[1, 3, 0, 5, 5] == 1.0
    assert out[0, 0, 1, 9, 9] == 1.0 and np.isclose(out[1, 0, 1, 0, 0], 0.2) and out[1, 1, 1, 0, 0] == 0.0
    assert not out[:, :, 2].any()
    assert data["summary"]["video_channel_min"] == [10, 0, 7] and data["summary"]["video_channel_max"] == [30, 255, 7]
    sample = arrays["audio_data"][1]
    assert np.allclose(data["m2"][1], (sample - sample.min()) / (sample.max() - sample.min()), atol=1e-6)
    assert "groups" not in data and "extraction" not in data["summary"]


def test_loader_returns_actor_groups_when_present(tmp_path):
    write_preprocessed_fixture(tmp_path, n=4, actors=True)
    data = loader.load(tmp_path)
    assert data["groups"].tolist() == [1, 2, 3, 1] and data["labels"].tolist() == [0, 1, 2, 3]


def test_loader_rejects_a_label_outside_the_eight_emotions(tmp_path):
    write_preprocessed_fixture(tmp_path, n=2)
    np.save(tmp_path / "label_data.npy", np.array([0, 8], dtype=np.int64))
    with pytest.raises(DataError, match="label 8 at position 1") as err:
        loader.load(tmp_path)
    assert str(tmp_path / "label_data.npy") in str(err.value)


def test_loader_rejects_mismatched_counts(tmp_path):
    arrays = write_preprocessed_fixture(tmp_path, n=3)
    np.save(tmp_path / "audio_data.npy", arrays["audio_data"][:2])
    with pytest.raises(DataError, match="2 clips but") as err:
        loader.load(tmp_path)
    assert str(tmp_path / "audio_data.npy") in str(err.value)


def test_loader_names_a_missing_file(tmp_path):
    write_preprocessed_fixture(tmp_path, n=2)
    (tmp_path / "video_data.npy").unlink()
    with pytest.raises(DataError, match="file not found") as err:
        loader.load(tmp_path)
    assert str(tmp_path / "video_data.npy") in str(err.value)


# --- helpers ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _one_thread():
    """One torch thread for the module-scoped extractions (conftest's per-test fixture is not active yet):
    MTCNN on tiny frames is as fast, and far faster when other processes load the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _frame(path: Path, index: int) -> np.ndarray:
    import cv2

    capture = cv2.VideoCapture(str(path))
    for _ in range(index + 1):
        ok, frame = capture.read()
        assert ok
    capture.release()
    return frame


def _centre_crop(frame: np.ndarray) -> np.ndarray:
    """The centred square of the frame (side = its shorter edge), resized to 224×224 like the extraction."""
    import cv2

    height, width = frame.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return cv2.resize(frame[top:top + side, left:left + side], (224, 224))
