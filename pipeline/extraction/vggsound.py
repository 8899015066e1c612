"""VGGSound-AVEL50k extraction: the CPSP metadata (CSV + per-second labels JSON) and the user's VGGSound clips →
the authors' AVEL feature layout (`VGGS50k_metadata.txt`, `visual_features/`, `audio_features/`, `seg_labels/`),
which `pipeline.data.vggsound` loads (and min-max normalises, the authors' step 3).

The authors do not publish their feature extractor; the features follow the AVE convention (Tian et al., ECCV
2018), which their preprocessing scripts assume. Per clip, per 1-s segment s = 0..9:
* visual: `frames_per_second` frames (AVE: 16) sampled evenly in the second, at s + (k + 0.5) / F (k = 0..F−1),
  each the decoded frame shown at that instant (the latest frame whose timestamp, counted from the first
  frame, is ≤ the target); RGB, resized to 224×224 (PIL bilinear), ImageNet mean/std; torchvision VGG19
  `.features` (conv layers up to pool5) → (512, 7, 7), averaged over the F frames, stored channel-last (7, 7, 512).
  All frames of a clip go through VGG19 in batches of `runtime.batch_size`.
* audio: the audio track decoded with PyAV, averaged to mono, resampled to 16 kHz with resampy (torchvggish's
  convention); each second's 16 000 samples → one VGGish log-mel example (96 frames × 64 bands,
  `torchvggish.vggish_input.waveform_to_examples`) → the VGGish network → 128-d; with `postprocess` (default,
  like the released AudioSet/AVE embeddings) the PCA/whitening, clipping to [−2, 2] and 8-bit quantisation to
  0..255 (stored as float32).
* segment labels: the JSON's 10 per-second 0/1 flags → `seg_labels/<stem>_sLabel.npy` (1, 10).

Authors' conventions kept: class ids in ORDER OF FIRST APPEARANCE of `category` in the CSV (over all rows,
present or not; their printed mapping starts "engine accelerating" = 0 and ends "tapping guitar" = 140); the
YouTube id of a clip file is characters 1..11 of its file name (`id_slice: [1, 12]`; their files carry a
one-character prefix and a `_<start>_<end>_out` tail, e.g. `v6bPsB1h3wvE_110_120_out.mp4`); the stem is the
file name up to its first dot; files are found at any depth under `videos/`, the first per id wins (sorted
path order here; theirs is os.walk order); metadata lines follow the CSV row order; CSV rows without a clip are
counted as missing and left out.

Deliberate divergences (switch in VGGSoundExtractParams where it changes results):
* the original AVE extractors are Keras VGG19 (Caffe-style BGR mean subtraction) and TensorFlow VGGish;
  torchvision/torchvggish features are close in kind but not numerically identical.
* clips shorter than 10 s (`short_clips: pad`, default): seconds after the last decoded video frame repeat the
  last real second's visual feature; audio seconds after the track ends are silence (zeros) before VGGish;
  counted in the summary (clips, visual and audio seconds). `short_clips: skip` drops such clips instead. Longer
  clips are cut at 10 s.
* a clip that cannot be decoded, has no video or no audio stream, or has no labels in the JSON is skipped in
  every modality (logged on stderr, counted by reason) instead of stopping the run; a repeated CSV video_id is
  kept once (the authors would write it twice).
* `weights: random_init` builds the same two networks with seeded random weights and, with `postprocess`, an
  identity PCA (zero means) — the summary says so; such features carry no meaning.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import vggsound as layout
from pipeline.data.validation import DataError
from pipeline.extraction.common import (AtomicFolder, ExtractRuntime, ItemCache, Stopwatch, WeightFile, WeightsError,
                                        find_weights, load_state_dict, progress, write_summary)
from pipeline.extraction.settings import VGGSoundExtractParams

CSV_FILE = "vggsound-avel50k.csv"
LABELS_FILE = "vggsound-avel50k_labels.json"
VIDEO_FOLDER = "videos"
SEGMENTS = layout.SEGMENTS
FRAME_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGGISH_RATE = 16_000              # VGGish's sample rate: one example per second = 16 000 samples
QUANTISE_RANGE = (-2.0, 2.0)      # VGGish postprocessing: clip to this range, then 8-bit quantise
CACHE_VERSION = 1                 # bump when the per-clip computation changes (old cache entries then miss)
RANDOM_INIT_SEED = 0              # random_init weights are seeded, so a re-run gives the same features

RAW_LAYOUT = (f"data/raw/vggsound50k/{CSV_FILE} and data/raw/vggsound50k/{LABELS_FILE} (the VGGSound-AVEL50k "
              "metadata of the CPSP release, jasongief/CPSP: the CSV's columns include video_id and category, the "
              "JSON is a list of {video_id: {\"label\": [10 flags 0/1]}}), plus the VGGSound 10-s clips (YouTube; "
              f"obtained separately) anywhere under data/raw/vggsound50k/{VIDEO_FOLDER}/, named as the authors' copy: "
              "one prefix character, the 11-character YouTube id, then a tail, e.g. v6bPsB1h3wvE_110_120_out.mp4 "
              "(any container/codec PyAV decodes, with a video and an audio stream). CSV rows without a clip are "
              "counted as missing and left out.")

WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile("vgg19-dcbb9e9d.pth", "dcbb9e9d", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
               "torchvision VGG19 ImageNet weights, for the visual features"),
    WeightFile("vggish-10086976.pth", "10086976",
               "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
               "torchvggish VGGish weights, for the audio features"),
    WeightFile("vggish_pca_params-970ea276.pth", "970ea276",
               "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish_pca_params-970ea276.pth",
               "VGGish PCA/whitening parameters, for the audio features' postprocessing"),
)
VGG19_WEIGHTS, VGGISH_WEIGHTS, PCA_WEIGHTS = WEIGHTS


@dataclass(frozen=True)
class Clip:
    """One CSV row whose clip was found: its YouTube id, file, stem (file name up to the first dot), class id
    and per-second event flags."""

    video_id: str
    path: Path
    stem: str
    label: int
    flags: np.ndarray


class Skip(Exception):
    """A clip cannot be used (unreadable, no stream, too short with `short_clips: skip`); it is left out of
    every modality."""


# ---------------------------------------------------------------------------------------------------- raw files

def video_id_of(file_name: str, id_slice: Iterable[int] = (1, 12)) -> str:
    """The YouTube id inside a clip's file name: characters [start, stop) (authors: 1..11)."""
    start, stop = id_slice
    return file_name[start:stop]


def read_csv(path: Path) -> list[tuple[str, str]]:
    """(video_id, category) of every CSV row, in file order; DataError naming the file for missing columns or
    empty cells."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected {RAW_LAYOUT}")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"video_id", "category"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: no column {', '.join(sorted(missing))}; expected a header with video_id and "
                            f"category (got {reader.fieldnames})")
        rows = []
        for number, row in enumerate(reader, start=2):
            video_id, category = (row["video_id"] or "").strip(), (row["category"] or "").strip()
            if not video_id or not category:
                raise DataError(f"{path}: line {number} has an empty video_id or category; expected both")
            rows.append((video_id, category))
    if not rows:
        raise DataError(f"{path}: no rows; expected one per clip")
    return rows


def class_ids(categories: Iterable[str]) -> dict[str, int]:
    """Category → class id in order of first appearance (the authors' `unique()` mapping)."""
    ids: dict[str, int] = {}
    for category in categories:
        ids.setdefault(category, len(ids))
    return ids


def read_segment_flags(path: Path) -> dict[str, np.ndarray]:
    """video_id → its 10 per-second 0/1 event flags from the labels JSON (a list of {video_id: {"label": [...]}},
    or one such mapping); DataError naming the file and the id for a malformed entry."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected {RAW_LAYOUT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); expected a list of {{video_id: {{\"label\": [...]}}}}") \
            from None
    entries = data if isinstance(data, list) else [data]
    flags: dict[str, np.ndarray] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {str(entry)[:40]!r} is not a mapping; expected {{video_id: "
                            "{\"label\": [...]}}")
        for video_id, info in entry.items():
            values = info.get("label") if isinstance(info, dict) else info
            array = np.asarray(values if isinstance(values, list) else [], dtype=np.float64)
            if array.shape != (SEGMENTS,) or not np.isin(array, (0, 1)).all():
                raise DataError(f"{path}: video {video_id!r}: label {values!r}; expected {SEGMENTS} flags 0 or 1")
            flags[str(video_id)] = array.astype(np.int64)
    return flags


def index_videos(folder: Path, id_slice: Iterable[int]) -> dict[str, Path]:
    """YouTube id → clip file, for every non-hidden file at any depth under `folder` (the first in sorted path
    order wins, as the authors keep the first they walk into)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; expected {RAW_LAYOUT}")
    found: dict[str, Path] = {}
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        for name in sorted(files):
            if not name.startswith("."):
                found.setdefault(video_id_of(name, id_slice), Path(directory) / name)
    return found


def find_clips(raw: Path, params: VGGSoundExtractParams) -> tuple[list[Clip], list[str], dict[str, Any]]:
    """The usable clips in CSV order, the class names in id order, and the facts of the raw check (missing
    videos, duplicate rows, clips without labels). Reads only metadata and the folder listing."""
    raw = Path(raw)
    rows = read_csv(raw / CSV_FILE)
    flags = read_segment_flags(raw / LABELS_FILE)
    videos = index_videos(raw / VIDEO_FOLDER, params.id_slice)
    ids = class_ids(category for _, category in rows)
    clips, missing, duplicates, unlabelled, seen = [], [], [], [], set()
    for video_id, category in rows:
        if video_id in seen:
            duplicates.append(video_id)
            continue
        seen.add(video_id)
        if video_id not in videos:
            missing.append(video_id)
        elif video_id not in flags:
            unlabelled.append(video_id)
        else:
            path = videos[video_id]
            clips.append(Clip(video_id, path, path.name.split(".")[0], ids[category], flags[video_id]))
    facts = {"csv_rows": len(rows), "missing_videos": len(missing), "missing_examples": missing[:10],
             "duplicate_rows": len(duplicates), "no_segment_labels": unlabelled}
    return clips, list(ids), facts


# ---------------------------------------------------------------------------------------------------- decoding

def segment_times(frames_per_second: int, segments: int = SEGMENTS) -> list[float]:
    """The sampling instants, F per second, at the middle of equal shares: s + (k + 0.5) / F."""
    return [s + (k + 0.5) / frames_per_second for s in range(segments) for k in range(frames_per_second)]


def frames_at(timed_frames: Iterable[tuple[float, Any]], targets: list[float]) -> tuple[list[Any], float]:
    """For each target instant (ascending), the frame shown then: the latest frame whose time is ≤ the target
    (the first frame for targets before it; the last for targets after the end). Also returns the last frame's
    time. Stops reading once every target is served, so a long clip is not decoded to its end."""
    chosen: list[Any] = []
    previous, last_time = None, -1.0
    for time, frame in timed_frames:
        while len(chosen) < len(targets) and targets[len(chosen)] < time:
            chosen.append(previous if previous is not None else frame)
        previous, last_time = frame, time
        if len(chosen) == len(targets):
            break
    if previous is None:
        return [], -1.0
    chosen.extend([previous] * (len(targets) - len(chosen)))
    return chosen, last_time


def _timed_video_frames(container, stream) -> Iterator[tuple[float, Any]]:
    """(seconds since the first frame, frame) of the video stream, in decoding order."""
    first = None
    for index, frame in enumerate(container.decode(stream)):
        time = frame.time if frame.time is not None else index / float(stream.average_rate or 25)
        first = time if first is None else first
        yield time - first, frame


def _rgb_224(frame) -> np.ndarray:
    """A decoded frame as a 224×224 RGB uint8 array (PIL bilinear resize)."""
    from PIL import Image

    return np.asarray(frame.to_image().resize((FRAME_SIZE, FRAME_SIZE), Image.BILINEAR), dtype=np.uint8)


def decode_clip(path: Path, frames_per_second: int) -> tuple[np.ndarray, int, np.ndarray]:
    """A clip's sampled frames (S·F, 224, 224, 3) uint8 for its S ≤ 10 seconds with video, S, and its mono audio
    at 16 kHz cut at 10 s; Skip when it cannot be decoded or lacks a stream."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise Skip("no video stream")
            if not container.streams.audio:
                raise Skip("no audio track")
            targets = segment_times(frames_per_second)
            chosen, last_time = frames_at(_timed_video_frames(container, container.streams.video[0]), targets)
        if not chosen:
            raise Skip("no decodable video frame")
        seconds = min(SEGMENTS, int(np.floor(last_time)) + 1)
        frames = _convert_once(chosen[:seconds * frames_per_second])
        with av.open(str(path)) as container:
            audio = _mono_16k(container, container.streams.audio[0])
    except av.FFmpegError as err:
        raise Skip(f"unreadable ({type(err).__name__}: {err})") from None
    if audio.size == 0:
        raise Skip("empty audio track")
    return frames, seconds, audio


def _convert_once(chosen: list[Any]) -> np.ndarray:
    """The chosen frames as (n, 224, 224, 3) uint8; a frame chosen for several instants is converted once."""
    converted: dict[int, np.ndarray] = {}
    for frame in chosen:
        if id(frame) not in converted:
            converted[id(frame)] = _rgb_224(frame)
    return np.stack([converted[id(frame)] for frame in chosen])


def _mono_16k(container, stream) -> np.ndarray:
    """The audio stream as float32 mono (channel mean) resampled to 16 kHz with resampy, cut at 10 s."""
    import av
    import resampy

    resampler = av.AudioResampler(format="fltp")     # planar float: to_ndarray() is (channels, samples)
    rate = stream.codec_context.sample_rate or stream.rate
    chunks = []
    for frame in container.decode(stream):
        rate = frame.sample_rate or rate
        chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
        if sum(chunk.shape[1] for chunk in chunks) > (SEGMENTS + 1) * rate:
            break                                    # a little beyond 10 s is enough for the resampler
    chunks.extend(out.to_ndarray() for out in resampler.resample(None))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    wave = np.concatenate(chunks, axis=1).mean(axis=0)
    if rate != VGGISH_RATE:
        wave = resampy.resample(wave, rate, VGGISH_RATE)
    return np.asarray(wave[:SEGMENTS * VGGISH_RATE], dtype=np.float32)


def log_mel_examples(audio: np.ndarray) -> np.ndarray:
    """One VGGish log-mel example (96×64) per second of 16 kHz audio, the missing tail as silence: (10, 96, 64)."""
    from torchvggish.vggish_input import waveform_to_examples

    padded = np.zeros(SEGMENTS * VGGISH_RATE, dtype=np.float64)
    padded[:len(audio)] = audio
    seconds = padded.reshape(SEGMENTS, VGGISH_RATE)
    return np.concatenate([waveform_to_examples(second, VGGISH_RATE, return_tensor=False) for second in seconds])


# ---------------------------------------------------------------------------------------------------- networks

@dataclass
class Extractors:
    """VGG19's convolutional part, VGGish, and the VGGish PCA (None without postprocessing), on one device."""

    vgg19: torch.nn.Module
    vggish: torch.nn.Module
    pca: tuple[torch.Tensor, torch.Tensor] | None
    device: torch.device
    batch_size: int


def needed_weights(params: VGGSoundExtractParams) -> tuple[WeightFile, ...]:
    """The weight files this run needs (the PCA file only with postprocessing)."""
    return WEIGHTS if params.postprocess else (VGG19_WEIGHTS, VGGISH_WEIGHTS)


def read_pca(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The VGGish PCA eigenvectors (128, 128) and means (128,) from torchvggish's file. That file stores NumPy
    arrays, which weights_only loading accepts only with NumPy's array-rebuilding functions allow-listed (still
    no arbitrary code)."""
    try:
        state = load_state_dict(path)
    except WeightsError:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = load_state_dict(path)
    try:
        matrix = torch.as_tensor(np.asarray(state["pca_eigen_vectors"]), dtype=torch.float32)
        means = torch.as_tensor(np.asarray(state["pca_means"]), dtype=torch.float32).reshape(-1)
    except KeyError as err:
        raise WeightsError(f"{path}: no entry {err}; expected pca_eigen_vectors and pca_means") from None
    if matrix.shape != (128, 128) or means.shape != (128,):
        raise WeightsError(f"{path}: PCA shapes {tuple(matrix.shape)} and {tuple(means.shape)}; expected (128, 128) "
                           "and (128,)")
    return matrix, means


def _numpy_globals() -> list[Any]:
    """NumPy's array-rebuilding function and types, for weights_only loading, also under the `numpy.core`
    module name that files pickled with NumPy 1 (torchvggish's, 2019) refer to."""
    try:
        from numpy._core import multiarray          # NumPy 2
    except ImportError:                             # NumPy 1
        from numpy.core import multiarray

    found: list[Any] = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
                        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                        (multiarray.scalar, "numpy.core.multiarray.scalar")]
    return found + [type(np.dtype(kind)) for kind in ("float32", "float64", "int64", "uint8")]


def vgg19_features() -> torch.nn.Sequential:
    """torchvision's VGG19 convolutional part (`vgg19().features`, conv1_1 … pool5) with torchvision's conv
    initialisation; built alone because the 102 M-parameter classifier is never used here."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"], batch_norm=False)
    for module in features.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    return features


def locate_weights(params: VGGSoundExtractParams, runtime: ExtractRuntime) -> dict[str, Path]:
    """The local paths of the needed weight files (checked against their checksums), before any heavy work;
    empty for random_init."""
    if runtime.weights != "pretrained":
        return {}
    return {weight.filename: find_weights(weight, runtime.weights_dir) for weight in needed_weights(params)}


def extractor_notes(params: VGGSoundExtractParams, runtime: ExtractRuntime) -> dict[str, str]:
    """Which weights each network uses, for the summary."""
    if runtime.weights == "pretrained":
        return {"vgg19": VGG19_WEIGHTS.filename, "vggish": VGGISH_WEIGHTS.filename,
                "vggish_pca": PCA_WEIGHTS.filename if params.postprocess else "none (postprocess: false)"}
    return {"vgg19": "random init (seeded)", "vggish": "random init (seeded)",
            "vggish_pca": "identity, zero means (random_init)" if params.postprocess else "none (postprocess: false)"}


def build_extractors(params: VGGSoundExtractParams, runtime: ExtractRuntime, paths: dict[str, Path]) -> Extractors:
    """The two networks in eval mode on the run device, with the published weights at `paths` (from
    locate_weights) or, for random_init, the same architectures with seeded random weights."""
    from torchvggish.torchvggish import _vgg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        vgg19 = vgg19_features()
        vggish = _vgg(postprocess=False)      # postprocess=True would fetch the PCA file from the network
    pca = (torch.eye(128), torch.zeros(128)) if params.postprocess else None
    if runtime.weights == "pretrained":
        state = load_state_dict(paths[VGG19_WEIGHTS.filename])
        vgg19.load_state_dict({key.removeprefix("features."): value for key, value in state.items()
                               if key.startswith("features.")})
        vggish.load_state_dict(load_state_dict(paths[VGGISH_WEIGHTS.filename]))
        pca = read_pca(paths[PCA_WEIGHTS.filename]) if params.postprocess else None
    device = runtime.torch_device()
    return Extractors(vgg19.to(device).eval(), vggish.to(device).eval(), pca, device, runtime.batch_size)


class LazyExtractors:
    """The extractors, built on first use: a re-run served entirely from the resume cache loads no network."""

    def __init__(self, params: VGGSoundExtractParams, runtime: ExtractRuntime, paths: dict[str, Path]) -> None:
        self.params, self.runtime, self.paths = params, runtime, paths
        self._built: Extractors | None = None

    def get(self) -> Extractors:
        if self._built is None:
            self._built = build_extractors(self.params, self.runtime, self.paths)
        return self._built


@torch.no_grad()
def visual_features(frames: np.ndarray, seconds: int, extractors: Extractors) -> np.ndarray:
    """VGG19 pool5 maps of (S·F, 224, 224, 3) frames, averaged per second → (S, 7, 7, 512) float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=extractors.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=extractors.device).view(1, 3, 1, 1)
    maps = []
    for start in range(0, len(frames), extractors.batch_size):
        batch = torch.from_numpy(frames[start:start + extractors.batch_size]).to(extractors.device)
        batch = (batch.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        maps.append(extractors.vgg19(batch).float().cpu())
    per_frame = torch.cat(maps).view(seconds, -1, 512, 7, 7)
    return per_frame.mean(dim=1).permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


@torch.no_grad()
def audio_features(examples: np.ndarray, extractors: Extractors) -> np.ndarray:
    """VGGish embeddings of (10, 96, 64) log-mel examples → (10, 128) float32, PCA-whitened and quantised to
    0..255 when the extractors carry a PCA."""
    batch = torch.from_numpy(np.asarray(examples, dtype=np.float32)).unsqueeze(1).to(extractors.device)
    embedding = extractors.vggish(batch).float().cpu()
    if extractors.pca is not None:
        embedding = quantise(embedding, *extractors.pca)
    return embedding.numpy().astype(np.float32)


def quantise(embedding: torch.Tensor, matrix: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """VGGish postprocessing: PCA/whitening (x − means) · matrixᵀ, clipped to [−2, 2], mapped to 0..255 and
    rounded (AudioSet's released embedding format)."""
    low, high = QUANTISE_RANGE
    projected = (embedding - means) @ matrix.T
    return torch.round((projected.clamp(low, high) - low) * (255.0 / (high - low)))


def pad_seconds(per_second: np.ndarray, segments: int = SEGMENTS) -> np.ndarray:
    """(S, ...) → (10, ...), the missing tail repeating the last second."""
    if len(per_second) >= segments:
        return per_second[:segments]
    tail = np.repeat(per_second[-1:], segments - len(per_second), axis=0)
    return np.concatenate([per_second, tail])


def extract_clip(clip: Clip, params: VGGSoundExtractParams, networks: Callable[[], Extractors]
                 ) -> dict[str, np.ndarray]:
    """One clip's visual (10, 7, 7, 512) and audio (10, 128) features and its padded seconds (video, audio);
    Skip when the clip cannot be used (found while decoding, before `networks()` is asked for the extractors)."""
    frames, seconds, audio = decode_clip(clip.path, params.frames_per_second)
    audio_seconds = min(SEGMENTS, int(round(len(audio) / VGGISH_RATE)))   # codec padding: a few ms past the end
    if params.short_clips == "skip" and min(seconds, audio_seconds) < SEGMENTS:
        raise Skip(f"shorter than {SEGMENTS} s (video {seconds} s, audio {audio_seconds} s; short_clips: skip)")
    extractors = networks()
    visual = pad_seconds(visual_features(frames, seconds, extractors))
    return {"visual": visual, "audio": audio_features(log_mel_examples(audio), extractors),
            "padded": np.array([SEGMENTS - seconds, SEGMENTS - audio_seconds], dtype=np.int64)}


# ---------------------------------------------------------------------------------------------------- the stage

def extract(raw: Path, out: Path, params: VGGSoundExtractParams, runtime: ExtractRuntime) -> dict:
    """Extract VGGSound-50k features from the raw clips under `raw` into the authors' AVEL layout in `out`
    (atomically), resumable per clip; returns the summary written to `out`/extraction.json."""
    clips, class_names, facts = find_clips(Path(raw), params)        # the raw check, before any heavy work
    if facts["no_segment_labels"]:
        print(f"vggsound50k: {len(facts['no_segment_labels'])} clips have no labels in {LABELS_FILE}; skipped "
              f"(e.g. {facts['no_segment_labels'][0]})", file=sys.stderr)
    extractors = LazyExtractors(params, runtime, locate_weights(params, runtime))   # weights checked here
    device = runtime.torch_device()
    cache = ItemCache(Path(runtime.cache_dir) / "vggsound50k",
                      {"version": CACHE_VERSION, "params": dataclasses.asdict(params), "weights": runtime.weights})
    watch = Stopwatch()
    skipped: list[dict[str, str]] = [{"video_id": vid, "reason": "no segment labels in the JSON"}
                                     for vid in facts.pop("no_segment_labels")]
    padded = np.zeros(3, dtype=np.int64)             # clips padded, visual seconds padded, audio seconds padded
    with AtomicFolder(Path(out)) as tmp:
        folders = [tmp / name for name in (layout.VISUAL_DIR, layout.AUDIO_DIR, layout.SEG_DIRS[0])]
        for folder in folders:
            folder.mkdir()
        kept: list[Clip] = []
        for clip in progress(clips, len(clips), "vggsound50k clips", runtime.progress):
            result = _cached_clip(clip, params, extractors.get, cache, skipped)
            if result is None:
                continue
            np.save(folders[0] / f"{clip.stem}_vFeature.npy", result["visual"], allow_pickle=False)
            np.save(folders[1] / f"{clip.stem}_aFeature.npy", result["audio"], allow_pickle=False)
            np.save(folders[2] / f"{clip.stem}_sLabel.npy", clip.flags.reshape(1, SEGMENTS), allow_pickle=False)
            padded += [int(result["padded"].any()), *result["padded"].tolist()]
            kept.append(clip)
        (tmp / layout.METADATA_FILE).write_text("".join(f"{c.stem}&{c.label}\n" for c in kept), encoding="utf-8")
        (tmp / layout.CLASSES_FILE).write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
        summary = _summary(kept, class_names, facts, skipped, padded, device, cache, watch, params, runtime)
        write_summary(tmp, summary)
    return summary


def _cached_clip(clip: Clip, params: VGGSoundExtractParams, networks: Callable[[], Extractors], cache: ItemCache,
                 skipped: list[dict[str, str]]) -> dict[str, np.ndarray] | None:
    """A clip's features from the resume cache or computed (and cached); None, logged and recorded, on Skip."""
    fingerprint = cache.file_fingerprint(clip.path)
    result = cache.get(clip.stem, fingerprint)
    if result is not None:
        return result
    try:
        result = extract_clip(clip, params, networks)
    except Skip as reason:
        print(f"vggsound50k: skipped {clip.path}: {reason}", file=sys.stderr)
        skipped.append({"video_id": clip.video_id, "file": str(clip.path), "reason": str(reason)})
        return None
    cache.put(clip.stem, fingerprint, result)
    return result


def _summary(kept: list[Clip], class_names: list[str], facts: dict[str, Any], skipped: list[dict[str, str]],
             padded: np.ndarray, device: torch.device, cache: ItemCache, watch: Stopwatch,
             params: VGGSoundExtractParams, runtime: ExtractRuntime) -> dict[str, Any]:
    """The extraction's counts and settings, for extraction.json and the prepared summary."""
    reasons = Counter(item["reason"].split(" (")[0] for item in skipped)
    return {"dataset": "vggsound50k", "items": len(kept), "classes": len(class_names), **facts,
            "skipped": {"count": len(skipped), "reasons": dict(reasons), "items": skipped[:100]},
            "fallbacks": {"padded_clips": int(padded[0]), "padded_visual_seconds": int(padded[1]),
                          "padded_audio_seconds": int(padded[2])},
            "weights": runtime.weights, "extractors": extractor_notes(params, runtime),
            "params": dataclasses.asdict(params),
            "cache": {"hits": cache.hits, "misses": cache.misses}, "throughput": watch.report(len(kept)),
            "device": str(device),
            "shapes": {"visual": list(layout.VISUAL_SHAPE), "audio": list(layout.AUDIO_SHAPE),
                       "segment_labels": list(layout.SEG_LABEL_SHAPE)}}
