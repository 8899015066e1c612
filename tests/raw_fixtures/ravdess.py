"""A tiny RAVDESS speech set in the publisher's format: `Speech/Actor_XX/01-01-EE-II-SS-RR-AA.mp4` (mp4v, 30 fps,
small frames holding a real face — matplotlib's bundled public-domain portrait of Grace Hopper — drifting over
a plain background and brightening over time) and `Audio_Speech/Actor_XX/03-…wav` (48 kHz 16-bit, a tone per
emotion plus noise), with optional bad clips (no face, corrupt MP4 or WAV, too short), and the authors' preprocessed
`.npy` layout for the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np

EMOTION_CODES = (1, 3, 5, 8, 2, 4, 6, 7)     # the first `classes` codes are used: 4 classes = 1, 3, 5, 8
FPS = 30
WAV_RATE = 48_000


def tiny_runtime(tmp_path: Path):
    """An ExtractRuntime for tests: random-init weights, no progress bar, CPU, cache under tmp_path."""
    from pipeline.extraction.common import ExtractRuntime

    return ExtractRuntime(weights="random_init", progress=False, device="cpu", cache_dir=str(Path(tmp_path) / "cache"))


def write_raw_fixture(root: Path, n_per_class: int = 6, classes: int = 4, seed: int = 0, *,
                      actors: tuple[int, ...] = (1, 2, 3), frames: int = 112, size: tuple[int, int] = (128, 96),
                      no_face: bool = False, corrupt: bool = False, corrupt_wav: bool = False,
                      short_frames: int | None = None) -> dict:
    """Write `classes` emotions × `n_per_class` clips (spread over `actors`, statements and repetitions, all at
    normal intensity) of `frames` frames of `size` (width, height) under `root`; optionally one clip without a
    face, one corrupt MP4 (random bytes, valid WAV), one corrupt WAV (valid MP4) and one clip of `short_frames`
    frames (all at intensity 02,
    emotion 03, so their codes never collide). Returns the codes written: clip stems sorted by actor then name,
    their labels and actors, and the stems of the special clips."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    if n_per_class > 4 * len(actors):
        raise ValueError(f"at most {4 * len(actors)} clips per class with {len(actors)} actors")
    face = _face(size[1])
    specs = []
    for code in EMOTION_CODES[:classes]:
        for k in range(n_per_class):
            statement, repetition = divmod(k // len(actors), 2)
            specs.append((_stem(code, 1, statement + 1, repetition + 1, actors[k % len(actors)]), "face", frames))
    special = {"no_face": None, "corrupt": None, "corrupt_wav": None, "short": None}
    if no_face:
        special["no_face"] = _stem(3, 2, 1, 1, actors[0])
        specs.append((special["no_face"], "blank", frames))
    if corrupt:
        special["corrupt"] = _stem(3, 2, 1, 2, actors[0])
        specs.append((special["corrupt"], "corrupt", frames))
    if corrupt_wav:
        special["corrupt_wav"] = _stem(3, 2, 2, 2, actors[0])
        specs.append((special["corrupt_wav"], "corrupt_wav", frames))
    if short_frames is not None:
        special["short"] = _stem(3, 2, 2, 1, actors[0])
        specs.append((special["short"], "face", short_frames))
    for stem, kind, count in specs:
        _write_clip(root, stem, kind, count, size, face, rng)
    ordered = sorted((stem for stem, _, _ in specs), key=lambda s: (int(s[-2:]), s))
    return {"root": root, "clips": ordered, "labels": [int(s.split("-")[2]) - 1 for s in ordered],
            "actors": [int(s[-2:]) for s in ordered], **special}


def write_preprocessed_fixture(root: Path, n: int = 8, seed: int = 0, *, actors: bool = False) -> dict:
    """The authors' RAVDESS_preprocessed_npy layout with `n` random clips (labels cycle 0..7); with `actors`,
    also our actor_data.npy. Returns the arrays written."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {"video_data": rng.integers(0, 256, (n, 15, 3, 224, 224), dtype=np.uint8),
              "audio_data": rng.normal(0, 50, (n, 15, 156)).astype(np.float32),
              "label_data": (np.arange(n) % 8).astype(np.int64)}
    if actors:
        arrays["actor_data"] = (np.arange(n) % 3 + 1).astype(np.int64)
    for name, array in arrays.items():
        np.save(root / f"{name}.npy", array, allow_pickle=False)
    return arrays


def _stem(emotion: int, intensity: int, statement: int, repetition: int, actor: int) -> str:
    """The code without the modality field's value: 01- for the MP4, 03- for the WAV."""
    return f"01-01-{emotion:02d}-{intensity:02d}-{statement:02d}-{repetition:02d}-{actor:02d}"


def _face(height: int) -> np.ndarray:
    """Grace Hopper's portrait (BGR) scaled to 70 % of the frame height."""
    import cv2
    import matplotlib.cbook

    image = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    face_height = int(0.7 * height)
    return cv2.resize(image, (face_height * image.shape[1] // image.shape[0], face_height))


def _write_clip(root: Path, stem: str, kind: str, frames: int, size: tuple[int, int], face: np.ndarray,
                rng: np.random.Generator) -> None:
    actor_dir = f"Actor_{stem[-2:]}"
    video = root / "Speech" / actor_dir / f"{stem}.mp4"
    audio = root / "Audio_Speech" / actor_dir / f"03{stem[2:]}.wav"
    video.parent.mkdir(parents=True, exist_ok=True)
    audio.parent.mkdir(parents=True, exist_ok=True)
    if kind == "corrupt":
        video.write_bytes(rng.bytes(4096))
    else:
        _write_video(video, frames, size, None if kind == "blank" else face, rng)
    if kind == "corrupt_wav":
        audio.write_bytes(rng.bytes(4096))
    else:
        _write_wav(audio, frames / FPS, int(stem.split("-")[2]), rng)


def _write_video(path: Path, frames: int, size: tuple[int, int], face: np.ndarray | None,
                 rng: np.random.Generator) -> None:
    """An mp4v clip: the face drifts right and the picture brightens from 70 % to 100 % over the clip (so
    frames from different windows differ)."""
    import cv2

    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (width, height))
    background = rng.integers(60, 200, 3)
    x0, y0 = int(rng.integers(2, 10)), (height - (face.shape[0] if face is not None else 0)) // 2
    for t in range(frames):
        frame = np.empty((height, width, 3), dtype=np.float32)
        frame[:] = background
        if face is not None:
            x = x0 + (t * (width - face.shape[1] - x0 - 2)) // max(frames - 1, 1)
            frame[y0:y0 + face.shape[0], x:x + face.shape[1]] = face
        writer.write(np.clip(frame * (0.7 + 0.3 * t / max(frames - 1, 1)), 0, 255).astype(np.uint8))
    writer.release()


def _write_wav(path: Path, seconds: float, emotion: int, rng: np.random.Generator) -> None:
    import soundfile

    t = np.arange(int(seconds * WAV_RATE)) / WAV_RATE
    wave = 0.3 * np.sin(2 * np.pi * 110 * emotion * t) + 0.05 * rng.standard_normal(len(t))
    soundfile.write(path, wave.astype(np.float32), WAV_RATE, subtype="PCM_16")
