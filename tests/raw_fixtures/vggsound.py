"""Tiny VGGSound-AVEL50k datasets written by tests: the authors' feature layout (random features) and the raw
layout (CPSP CSV + labels JSON + MP4 clips with audio, written with PyAV).

Clip files follow the authors' naming: `v<11-character YouTube id>_<start>_<end>_out.mp4`, nested one folder
deep under `videos/` (one folder per class, as VGGSound copies are often organised). The CSV lists one clip of
each class first, in the order of CATEGORIES — deliberately not alphabetical, so a test can tell first-appearance
class ids from sorted ones — then the rest in a seeded shuffle.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.extraction.common import ExtractRuntime

# Real VGGSound-AVEL50k categories, in an order that is neither alphabetical nor the authors' id order.
CATEGORIES = ("playing harp", "dog barking", "tapping guitar", "cat purring", "engine accelerating", "owl hooting")
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
VISUAL_SHAPE, AUDIO_SHAPE = (10, 7, 7, 512), (10, 128)


def tiny_runtime(tmp_path: Path, **changes) -> ExtractRuntime:
    """Random-init extractors on the CPU, no progress bar, resume cache under `tmp_path`."""
    settings = {"weights_dir": str(tmp_path / "weights"), "weights": "random_init", "batch_size": 16,
                "progress": False, "device": "cpu", "cache_dir": str(tmp_path / "cache"), **changes}
    return ExtractRuntime(**settings)


def youtube_ids(count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct 11-character ids from YouTube's alphabet (with '-' and '_', which the slicing must keep)."""
    ids: list[str] = []
    while len(ids) < count:
        candidate = "".join(rng.choice(list(ID_CHARS), 11))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def clip_name(video_id: str, index: int) -> str:
    """The authors' file name of a clip: prefix, id, start and end seconds, `_out`."""
    return f"v{video_id}_{30 * index}_{30 * index + 10}_out.mp4"


def segment_flags(rng: np.random.Generator) -> list[int]:
    """10 per-second event flags with at least one event."""
    flags = rng.integers(0, 2, 10)
    flags[rng.integers(0, 10)] = 1
    return flags.tolist()


# ---------------------------------------------------------------------------------------------------- features

def write_feature_fixture(root: Path, n_per_class: int = 6, classes: int = 4, seed: int = 0,
                          seg_folder: str = "seg_labels", scale: float = 3.0) -> dict:
    """The authors' feature layout under `root` with random (unnormalised) features; returns what was written:
    stems, labels (in metadata order), visual (N,10,7,7,512), audio (N,10,128) and flags (N,10)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = n_per_class * classes
    labels = np.repeat(np.arange(classes), n_per_class)
    rng.shuffle(labels)
    stems = [clip_name(video_id, i).split(".")[0] for i, video_id in enumerate(youtube_ids(n, rng))]
    visual = (rng.standard_normal((n, *VISUAL_SHAPE)) * scale + 1.0).astype(np.float32)
    audio = rng.uniform(0, 255, (n, *AUDIO_SHAPE)).round().astype(np.float32)
    flags = np.array([segment_flags(rng) for _ in range(n)], dtype=np.int64)
    write_feature_layout(root, stems, labels, visual, audio, flags, seg_folder)
    return {"stems": stems, "labels": labels.astype(np.int64), "visual": visual, "audio": audio, "flags": flags}


def write_feature_layout(root: Path, stems: list[str], labels: np.ndarray, visual: np.ndarray, audio: np.ndarray,
                         flags: np.ndarray, seg_folder: str = "seg_labels") -> None:
    """Write given arrays in the authors' feature layout (metadata, per-clip .npy files, segment labels)."""
    root = Path(root)
    for folder in ("visual_features", "audio_features", seg_folder):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        np.save(root / "visual_features" / f"{stem}_vFeature.npy", visual[i], allow_pickle=False)
        np.save(root / "audio_features" / f"{stem}_aFeature.npy", audio[i], allow_pickle=False)
        np.save(root / seg_folder / f"{stem}_sLabel.npy", np.asarray(flags[i]).reshape(1, 10), allow_pickle=False)
    (root / "VGGS50k_metadata.txt").write_text("".join(f"{s}&{int(y)}\n" for s, y in zip(stems, labels)))


# ---------------------------------------------------------------------------------------------------- raw clips

def write_clip(path: Path, label: int, seconds: float, size: tuple[int, int] = (64, 48), fps: int = 8,
               sample_rate: int = 22_050, audio: bool = True) -> None:
    """An MP4 (MPEG-4 Part 2 video, AAC audio) of `seconds`: a class colour with a bar moving with time, and a
    sine tone of 220·(label + 1) Hz."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = container.add_stream("aac", rate=sample_rate) if audio else None
        if sound is not None:
            sound.layout = "mono"
        colour = np.array([(53 * label) % 256, (97 * label + 80) % 256, (151 * label + 160) % 256], dtype=np.uint8)
        for index in range(int(round(seconds * fps))):
            image = np.broadcast_to(colour, (height, width, 3)).copy()
            image[:, (4 * index) % width] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            _write_tone(container, sound, 220.0 * (label + 1), seconds, sample_rate)


def _write_tone(container, stream, frequency: float, seconds: float, sample_rate: int) -> None:
    import av

    samples = int(seconds * sample_rate)
    wave = (0.3 * np.sin(2 * np.pi * frequency * np.arange(samples) / sample_rate)).astype(np.float32)
    for start in range(0, samples, 1024):
        chunk = wave[start:start + 1024]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = sample_rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_raw_fixture(root: Path, n_per_class: int = 2, classes: int = 4, seed: int = 0,
                      seconds: float | tuple[float, ...] = 10.0, size: tuple[int, int] = (64, 48), fps: int = 8,
                      sample_rate: int = 22_050, missing: int = 0, corrupt: int = 0, no_audio: int = 0,
                      unlabelled_extra: int = 1) -> dict:
    """The raw VGGSound-AVEL50k layout under `root`: `vggsound-avel50k.csv` (video_id, category, split),
    `vggsound-avel50k_labels.json` (a list of {video_id: {"label": [...]}}, plus `unlabelled_extra` entries
    for ids not in the CSV) and one MP4 per row under `videos/<class folder>/`, except: the last `missing`
    rows get no file, the `corrupt` rows before them get random bytes, the `no_audio` rows before those get
    a video without audio. `seconds` is one length or a sequence cycled over the rows.

    Returns rows [(video_id, category)], categories in first-appearance order, labels (class ids by first
    appearance), files (None for missing), flags {video_id: [10]}, and the ids of the missing, corrupt and
    no-audio rows."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = list(CATEGORIES[:classes])
    order = list(range(classes)) + list(rng.permutation(np.repeat(np.arange(classes), n_per_class - 1)))
    ids = youtube_ids(len(order), rng)
    lengths = [seconds] * len(order) if np.isscalar(seconds) else [seconds[i % len(seconds)] for i in
                                                                     range(len(order))]
    n = len(order)
    missing_rows = set(range(n - missing, n))
    corrupt_rows = set(range(n - missing - corrupt, n - missing))
    silent_rows = set(range(n - missing - corrupt - no_audio, n - missing - corrupt))
    files: list[Path | None] = []
    for i, (video_id, label) in enumerate(zip(ids, order)):
        if i in missing_rows:
            files.append(None)
            continue
        path = root / "videos" / categories[label].replace(" ", "_") / clip_name(video_id, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in corrupt_rows:
            path.write_bytes(rng.bytes(3000))
        else:
            write_clip(path, int(label), float(lengths[i]), size, fps, sample_rate, audio=i not in silent_rows)
        files.append(path)
    flags = {video_id: segment_flags(rng) for video_id in ids}
    extra = {video_id: segment_flags(rng) for video_id in youtube_ids(unlabelled_extra, rng)}
    rows = [(video_id, categories[label]) for video_id, label in zip(ids, order)]
    _write_csv(root / "vggsound-avel50k.csv", rows)
    entries = [{vid: {"label": value}} for vid, value in {**flags, **extra}.items()]
    (root / "vggsound-avel50k_labels.json").write_text(json.dumps(entries))
    return {"rows": rows, "categories": categories, "labels": [int(label) for label in order], "files": files,
            "flags": flags, "missing": [ids[i] for i in sorted(missing_rows)],
            "corrupt": [ids[i] for i in sorted(corrupt_rows)], "no_audio": [ids[i] for i in sorted(silent_rows)]}


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "category", "split"])
        for i, (video_id, category) in enumerate(rows):
            writer.writerow([video_id, category, ("train", "train", "val", "test")[i % 4]])
