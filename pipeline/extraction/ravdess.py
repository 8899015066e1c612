"""RAVDESS speech extraction: the publisher's WAV and MP4 files → the authors' `RAVDESS_preprocessed_npy/`
arrays (face-crop video, MFCC audio, labels), as their three preprocessing scripts build them.

Per clip (a full-AV `01-…mp4` paired with the audio-only `03-…wav` of the same remaining code):
* video: 15 frames at indices ⌊i·108/15⌋ + ⌊108/30⌋ (i = 0..14) of a 108-frame window (3.6 s at the nominal
  30 fps), read with OpenCV (BGR); faces found with facenet-pytorch's MTCNN (default settings, largest face
  first) on the RGB frames, all 15 in one batch; the BGR frame is cropped at the first box (coordinates rounded)
  and resized to 224×224 (cv2.resize, bilinear); a frame without a face reuses the previous frame's box; black
  frames pad a clip that ends early. Saved in BGR order, transposed to (15, 3, 224, 224) uint8 — as the authors.
* audio: librosa at 22 050 Hz mono, forced to 3.6 s = 79 380 samples (zero-padded at the end, or cropped equally
  from both ends), written to 16-bit PCM WAV and read back (the authors' soundfile round trip, done in memory),
  then `librosa.feature.mfcc(n_mfcc=15)` with librosa's defaults → (15, 156) float32.
* label = emotion field − 1 (0..7); actor = the last field.

Deliberate divergences, each with its reason (switch in RavdessExtractParams where it changes results):
* `windowing: authors` (default) reproduces the authors' window: frames from the clip START (their "centre
  3.6 s" skip is guarded by an inverted condition and never fires) while the audio is centre-cropped, so the
  two modalities cover different spans. `aligned` takes the frames from the centred window instead —
  skip = (n_frames − 108) // 2 frames when the clip has more than 108 (else 0), frame i at skip + index_i — and
  starts the audio crop at the same instant, sample round(skip · 22050 / 30), clamped to [0, max(n − 79380, 0)]
  (zero padding at the end as before). When the WAV and the MP4 have equal length this equals the authors'
  centre crop up to one frame's rounding; for clips of ≤ 108 frames the audio then starts at 0.
* a miss on a clip's FIRST frame crashes the authors' loop (no previous box). Here it uses the first later
  frame's box, or a centred square crop (side = the frame's shorter edge) when no frame of the clip has a face;
  counted in the summary (clips and frames) and logged once per clip.
* a box reaching outside the frame is clipped to the image (the authors' slice would wrap a negative start).
* an unreadable clip (OpenCV cannot open it, no frame at the selected indices, or librosa cannot read the WAV)
  is skipped in BOTH modalities, logged and counted, instead of stopping the run.
* sample order: sorted by actor, then by file name. The authors rely on os.walk order, which the file system
  decides (undefined); their split permutations index that order, so exact split reproduction needs their
  order, which cannot be recovered from their code.
* MTCNN's weights ship inside the facenet-pytorch wheel, so no weight file is needed (WEIGHTS is empty) and
  `weights: random_init` changes nothing here: the detector is always the published one, and the MFCCs have
  no weights. `batch_size` is not used either: one MTCNN batch is one clip's 15 frames.
"""

from __future__ import annotations

import dataclasses
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.ravdess import (ACTOR_FILE, AUDIO_FILE, CLIPS_FILE, EMOTIONS, FACE_SIZE, FRAMES, LABEL_FILE,
                                   MFCC_BINS, MFCC_STEPS, VIDEO_FILE)
from pipeline.data.validation import DataError
from pipeline.extraction.common import (AtomicFolder, ExtractRuntime, ItemCache, Stopwatch, WeightFile, progress,
                                        write_summary)
from pipeline.extraction.settings import RavdessExtractParams

SAMPLE_RATE = 22_050
CLIP_SECONDS = 3.6
AUDIO_SAMPLES = 79_380            # 3.6 s × 22 050 Hz
VIDEO_FPS = 30                    # RAVDESS' nominal frame rate, which the authors' 108-frame window assumes
WINDOW_FRAMES = 108               # 3.6 s × 30 fps
VIDEO_FOLDER = "Speech"
AUDIO_FOLDER = "Audio_Speech"
CACHE_VERSION = 1                 # bump when the per-clip computation changes (old cache entries then miss)
_COUNT_KEYS = ("fallback_frames", "reused_frames", "centre_crop", "padded_frames")   # per-clip counts, cached

RAW_LAYOUT = (f"data/raw/ravdess/{AUDIO_FOLDER}/Actor_XX/03-01-EE-II-SS-RR-AA.wav (the 1440 speech WAVs of "
              "Zenodo record 1188976, Audio_Speech_Actors_01-24.zip, unpacked into a folder renamed Audio_Speech) and "
              f"data/raw/ravdess/{VIDEO_FOLDER}/Actor_XX/01-01-EE-II-SS-RR-AA.mp4 (the full-AV speech MP4s of "
              "Video_Speech_Actor_01.zip … Video_Speech_Actor_24.zip, their Actor_XX folders gathered under Speech; "
              "the video-only 02-… files may stay, they are ignored). Every 01-… MP4 needs the 03-… WAV with the "
              "same remaining code and vice versa; EE is the emotion 01..08, AA the actor 01..24.")

WEIGHTS: tuple[WeightFile, ...] = ()   # MTCNN's weights ship in the facenet-pytorch wheel

_CODE = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")


@dataclass(frozen=True)
class Clip:
    """One sample: a full-AV MP4 and its audio-only WAV, with its label and actor."""

    stem: str
    video: Path
    audio: Path
    label: int
    actor: int


class Unreadable(Exception):
    """A clip's media cannot be decoded; the clip is skipped in both modalities."""


def frame_indices(count: int = FRAMES, window: int = WINDOW_FRAMES) -> list[int]:
    """`count` frame indices spread evenly over `window` frames, each at the middle of its equal share:
    ⌊i·window/count⌋ + ⌊window/(2·count)⌋ (15 of 108: 3, 10, 17, …, 103)."""
    return [i * window // count + window // (2 * count) for i in range(count)]


def window_skip(n_frames: int, windowing: str) -> int:
    """Frames skipped before the 108-frame window: 0 for the authors (their skip never fires), the centring
    offset (n_frames − 108) // 2 for `aligned` when the clip is longer than the window."""
    if windowing == "aligned" and n_frames > WINDOW_FRAMES:
        return (n_frames - WINDOW_FRAMES) // 2
    return 0


def audio_start(n_samples: int, windowing: str, skip_frames: int = 0) -> int:
    """First sample of the 3.6 s audio crop: the centre crop (n − 79380) // 2 for the authors, the video
    window's start (skip_frames at 30 fps) for `aligned`; clamped so the crop stays inside the signal."""
    latest = max(n_samples - AUDIO_SAMPLES, 0)
    if windowing == "aligned":
        return min(int(round(skip_frames * SAMPLE_RATE / VIDEO_FPS)), latest)
    return latest // 2


def parse_code(path: Path, modality: str) -> tuple[int, ...]:
    """The 7 numeric fields of a RAVDESS file name (modality-vocal-emotion-intensity-statement-repetition-actor),
    checked: modality as expected, vocal channel 01 (speech), emotion 01..08; DataError naming the file."""
    match = _CODE.match(path.stem)
    if match is None:
        raise DataError(f"{path}: file name is not a RAVDESS code; expected {modality}-01-EE-II-SS-RR-AA{path.suffix}")
    fields = tuple(int(field) for field in match.groups())
    if f"{fields[0]:02d}" != modality or fields[1] != 1:
        raise DataError(f"{path}: code starts {fields[0]:02d}-{fields[1]:02d}; expected {modality}-01 (speech)")
    if not 1 <= fields[2] <= len(EMOTIONS):
        raise DataError(f"{path}: emotion field {fields[2]:02d} is outside the 8 emotions; expected 01..08")
    return fields


def find_clips(raw: Path) -> list[Clip]:
    """Every full-AV speech clip under `raw`, paired with its WAV and labelled, sorted by actor then file name;
    DataError (one line, naming the file) for a missing folder, a malformed name or an unpaired file."""
    raw = Path(raw)
    videos = _coded_files(raw / VIDEO_FOLDER, "*.mp4", "01", skip_prefix="02-")
    audios = _coded_files(raw / AUDIO_FOLDER, "*.wav", "03")
    clips = []
    for code, (video, fields) in videos.items():
        if code not in audios:
            raise DataError(f"{raw / AUDIO_FOLDER / video.parent.name / ('03-' + code + '.wav')}: file not found; "
                            f"expected the audio of {video}")
        clips.append(Clip(stem=video.stem, video=video, audio=audios[code][0], label=fields[2] - 1, actor=fields[6]))
    for code, (audio, _) in audios.items():
        if code not in videos:
            raise DataError(f"{raw / VIDEO_FOLDER / audio.parent.name / ('01-' + code + '.mp4')}: file not found; "
                            f"expected the video of {audio}")
    if not clips:
        raise DataError(f"{raw / VIDEO_FOLDER}: no 01-…mp4 clips found; expected {RAW_LAYOUT}")
    return sorted(clips, key=lambda clip: (clip.actor, clip.video.name))


def _coded_files(folder: Path, pattern: str, modality: str, skip_prefix: str | None = None
                 ) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Files of `folder`/Actor_XX/ keyed by their code without the modality field (the pairing key)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; expected {RAW_LAYOUT}")
    found = {}
    for path in sorted(folder.glob(f"Actor_*/{pattern}")):
        if skip_prefix and path.name.startswith(skip_prefix):
            continue                     # video-only clips: not used
        fields = parse_code(path, modality)
        if path.parent.name != f"Actor_{fields[6]:02d}":
            raise DataError(f"{path}: actor field {fields[6]:02d} does not match its folder {path.parent.name}")
        found[path.stem[3:]] = (path, fields)
    return found


def read_frames(path: Path, windowing: str) -> tuple[list[np.ndarray], int]:
    """The BGR frames at the window's 15 indices (fewer when the clip ends early) and the skip used;
    Unreadable when OpenCV cannot open the file or no selected frame can be decoded."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise Unreadable(f"{path.name}: OpenCV cannot open it")
        skip = window_skip(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), windowing)
        wanted = {skip + index for index in frame_indices()}
        frames: list[np.ndarray] = []
        for position in range(max(wanted) + 1):
            if not capture.grab():
                break                    # the clip ended early: the missing frames become black padding
            if position in wanted:
                ok, frame = capture.retrieve()
                if not ok:
                    break
                frames.append(frame)
    finally:
        capture.release()
    if not frames:
        raise Unreadable(f"{path.name}: no frame could be decoded at the selected indices")
    return frames, skip


def detect_first_boxes(detector: Any, frames: list[np.ndarray]) -> list[np.ndarray | None]:
    """MTCNN's first (largest) box per frame, as float (x1, y1, x2, y2), or None where no face was found; one
    batched call on the RGB frames."""
    rgb = np.stack([frame[:, :, ::-1] for frame in frames])
    boxes, _ = detector.detect(rgb)
    # NumPy 2: facenet-pytorch returns an object array (None for a miss); cast each hit to float
    return [None if found is None else np.asarray(found, dtype=np.float64)[0] for found in boxes]


def resolve_boxes(boxes: list[np.ndarray | None], height: int, width: int) -> tuple[list[np.ndarray], dict[str, int]]:
    """A box for every frame: a miss reuses the previous frame's box (the authors' rule); misses before the
    first detection use the first later box, and a clip without any detection a centred square (our fallback
    for the authors' crash). Returns the boxes and counts: fallback frames, reused frames, centre crop (0/1)."""
    hits = [i for i, box in enumerate(boxes) if box is not None]
    if not hits:
        side = min(height, width)
        centre = np.array([(width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2],
                          dtype=np.float64)
        return [centre] * len(boxes), {"fallback_frames": len(boxes), "reused_frames": 0, "centre_crop": 1}
    resolved, current, reused = [], boxes[hits[0]], 0
    for i, box in enumerate(boxes):
        if box is not None:
            current = box
        elif i > hits[0]:
            reused += 1
        resolved.append(current)
    return resolved, {"fallback_frames": hits[0], "reused_frames": reused, "centre_crop": 0}


def crop_face(frame: np.ndarray, box: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The BGR frame cropped at `box` (rounded like the authors, clipped to the image) and resized to
    size×size (224) with cv2.resize's default (bilinear) interpolation; uint8 (size, size, 3)."""
    import cv2

    height, width = frame.shape[:2]
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, x2 = min(max(x1, 0), width - 1), min(max(x2, 1), width)
    y1, y2 = min(max(y1, 0), height - 1), min(max(y2, 1), height)
    crop = frame[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
    return cv2.resize(crop, (size, size))


def face_crops(detector: Any, frames: list[np.ndarray], size: int = FACE_SIZE) -> tuple[np.ndarray, dict[str, int]]:
    """The clip's 15 face crops (15, 224, 224, 3) uint8 BGR, black-padded when the clip ended early, and the
    counts of fallback, reused and padded frames."""
    boxes, counts = resolve_boxes(detect_first_boxes(detector, frames), *frames[0].shape[:2])
    crops = np.zeros((FRAMES, size, size, 3), dtype=np.uint8)
    for i, (frame, box) in enumerate(zip(frames, boxes)):
        crops[i] = crop_face(frame, box, size)
    return crops, {**counts, "padded_frames": FRAMES - len(frames)}


def fit_audio(wave: np.ndarray, start: int) -> np.ndarray:
    """79 380 samples from `start`, zero-padded at the end when the signal is shorter."""
    piece = np.asarray(wave[start:start + AUDIO_SAMPLES], dtype=np.float32)
    return np.pad(piece, (0, AUDIO_SAMPLES - len(piece)))


def pcm16_round_trip(wave: np.ndarray) -> np.ndarray:
    """`wave` written as a 16-bit PCM WAV at 22 050 Hz and read back with librosa (the authors save the cropped
    audio with soundfile's default WAV subtype and reload it for the MFCCs), done in memory."""
    import librosa
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    buffer.seek(0)
    restored, _ = librosa.load(buffer, sr=SAMPLE_RATE, mono=True)
    return restored


def audio_mfcc(path: Path, windowing: str, skip_frames: int = 0) -> np.ndarray:
    """The clip's (15, 156) float32 MFCCs: librosa load at 22 050 Hz mono, 3.6 s crop/pad, PCM-16 round trip,
    librosa.feature.mfcc(n_mfcc=15) with librosa's defaults; Unreadable when the WAV cannot be decoded."""
    import librosa
    import soundfile

    try:
        soundfile.info(str(path))    # librosa would fall back to the slow, deprecated audioread on a bad file
        wave, _ = librosa.load(path, sr=SAMPLE_RATE, mono=True)
    except Exception as err:   # noqa: BLE001 - any decoder failure means the file is unreadable
        raise Unreadable(f"{path.name}: not a readable audio file ({type(err).__name__})") from None
    if len(wave) == 0:
        raise Unreadable(f"{path.name}: no audio samples")
    wave = pcm16_round_trip(fit_audio(wave, audio_start(len(wave), windowing, skip_frames)))
    mfcc = librosa.feature.mfcc(y=wave, sr=SAMPLE_RATE, n_mfcc=MFCC_BINS).astype(np.float32)
    if mfcc.shape != (MFCC_BINS, MFCC_STEPS):
        raise Unreadable(f"{path.name}: MFCC shape {mfcc.shape}, expected {(MFCC_BINS, MFCC_STEPS)}")
    return mfcc


def extract_clip(detector: Any, clip: Clip, windowing: str, size: int = FACE_SIZE) -> dict[str, np.ndarray]:
    """One clip's cache entry: faces (15,size,size,3) uint8, mfcc (15,156) float32 and its frame counts."""
    frames, skip = read_frames(clip.video, windowing)
    faces, counts = face_crops(detector, frames, size)
    mfcc = audio_mfcc(clip.audio, windowing, skip)
    return {"faces": faces, "mfcc": mfcc, **{key: np.int64(value) for key, value in counts.items()}}


def build_detector(runtime: ExtractRuntime) -> Any:
    """facenet-pytorch's MTCNN with its default settings and wheel-shipped weights, in eval mode on the run
    device (the authors pass image_size=(720, 1280), which only affects MTCNN's forward, not `detect`)."""
    from facenet_pytorch import MTCNN

    return MTCNN(device=runtime.torch_device()).eval()


def extract(raw: Path, out: Path, params: RavdessExtractParams, runtime: ExtractRuntime) -> dict:
    """Extract every paired clip under `raw` into `out` (video_data, audio_data, label_data, actor_data .npy,
    clips.txt, extraction.json) and return the extraction summary; the raw layout is checked first, each
    clip's result is cached for resumption, and unreadable clips are skipped in both modalities."""
    import torch

    clips = find_clips(raw)
    detector = build_detector(runtime)
    cache = ItemCache(Path(runtime.cache_dir) / "ravdess", _cache_settings(params))
    watch = Stopwatch()
    kept, skipped, counts = [], [], []
    with torch.no_grad():
        for clip in progress(clips, len(clips), "ravdess clips", runtime.progress):
            entry = _cached_clip(cache, detector, clip, params.windowing, params.face_size)
            if isinstance(entry, str):
                print(f"ravdess: skipped clip {clip.stem} in both modalities: {entry}", file=sys.stderr)
                skipped.append({"clip": clip.stem, "reason": entry})
                continue
            kept.append(clip)
            counts.append({key: int(entry[key]) for key in _COUNT_KEYS})
            _log_fallback(clip, counts[-1])
    if not kept:
        raise DataError(f"{raw}: none of the {len(clips)} clips could be read; see the skip messages above")
    hits, misses = cache.hits, cache.misses     # before the write pass re-reads the entries
    with AtomicFolder(out) as folder:
        _write_arrays(folder, cache, kept, params.face_size)
        summary = _summary(clips, kept, skipped, counts, params, runtime, watch, (hits, misses))
        write_summary(folder, summary)
    return summary


def _cache_settings(params: RavdessExtractParams) -> dict[str, Any]:
    return {"dataset": "ravdess", "version": CACHE_VERSION, **dataclasses.asdict(params)}


def _cached_clip(cache: ItemCache, detector: Any, clip: Clip, windowing: str,
                 size: int) -> dict[str, np.ndarray] | str:
    """The clip's cached result, or a fresh one (then cached); the skip reason when its media are unreadable."""
    fingerprint = ItemCache.file_fingerprint(clip.video, clip.audio)
    entry = cache.get(clip.stem, fingerprint)
    if entry is not None:
        return entry
    try:
        entry = extract_clip(detector, clip, windowing, size)
    except Unreadable as err:
        return str(err)
    cache.put(clip.stem, fingerprint, entry)
    return entry


def _log_fallback(clip: Clip, counts: dict[str, int]) -> None:
    if counts["centre_crop"]:
        print(f"ravdess: {clip.video.name}: no face found in any frame; used a centred square crop",
              file=sys.stderr)
    elif counts["fallback_frames"]:
        print(f"ravdess: {clip.video.name}: no face in the first {counts['fallback_frames']} frame(s); used the "
              "first later detection's box", file=sys.stderr)


def _write_arrays(folder: Path, cache: ItemCache, kept: list[Clip], size: int) -> None:
    """Stream the kept clips from the cache into the output arrays (the video one is memory-mapped: the full
    dataset's is 3.25 GB)."""
    n = len(kept)
    video = np.lib.format.open_memmap(folder / VIDEO_FILE, mode="w+", dtype=np.uint8,
                                      shape=(n, FRAMES, 3, size, size))
    audio = np.empty((n, MFCC_BINS, MFCC_STEPS), dtype=np.float32)
    for i, clip in enumerate(kept):
        entry = cache.get(clip.stem, ItemCache.file_fingerprint(clip.video, clip.audio))
        if entry is None:
            raise DataError(f"{cache.root}: cache entry of {clip.stem} vanished during extraction; run it again")
        video[i] = entry["faces"].transpose(0, 3, 1, 2)
        audio[i] = entry["mfcc"]
    video.flush()
    del video
    np.save(folder / AUDIO_FILE, audio, allow_pickle=False)
    np.save(folder / LABEL_FILE, np.array([clip.label for clip in kept], dtype=np.int64), allow_pickle=False)
    np.save(folder / ACTOR_FILE, np.array([clip.actor for clip in kept], dtype=np.int64), allow_pickle=False)
    (folder / CLIPS_FILE).write_text("".join(f"{clip.stem}\n" for clip in kept))


def _summary(clips: list[Clip], kept: list[Clip], skipped: list[dict], counts: list[dict[str, int]],
             params: RavdessExtractParams, runtime: ExtractRuntime, watch: Stopwatch,
             cache_counts: tuple[int, int]) -> dict[str, Any]:
    n = len(kept)
    fallback_clips = [clip.stem for clip, c in zip(kept, counts) if c["fallback_frames"]]
    return {
        "dataset": "ravdess",
        "items": n,
        "clips_found": len(clips),
        "skipped": {"count": len(skipped), "clips": skipped},
        "fallbacks": {"clips": len(fallback_clips), "frames": sum(c["fallback_frames"] for c in counts),
                      "centre_crop_clips": sum(c["centre_crop"] for c in counts), "names": fallback_clips},
        "reused_previous_box_frames": sum(c["reused_frames"] for c in counts),
        "padded": {"clips": sum(1 for c in counts if c["padded_frames"]),
                   "frames": sum(c["padded_frames"] for c in counts)},
        "weights": runtime.weights,
        "face_detector": "facenet-pytorch MTCNN, weights shipped in the wheel (the same in both weights modes)",
        "params": dataclasses.asdict(params),
        "order": "sorted by actor, then file name",
        "class_counts": np.bincount([clip.label for clip in kept], minlength=len(EMOTIONS)).tolist(),
        "cache": {"hits": cache_counts[0], "misses": cache_counts[1]},
        "throughput": watch.report(n),
        "shapes": {"video_data": [n, FRAMES, 3, params.face_size, params.face_size], "audio_data": [n, MFCC_BINS, MFCC_STEPS],
                   "label_data": [n], "actor_data": [n]},
    }
