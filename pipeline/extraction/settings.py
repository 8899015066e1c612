"""The extraction stages' parameters (the `extraction` block of params.yaml) and which module extracts which
dataset. Kept apart from the extraction code, so that every stage that parses params.yaml depends on these
declarations only, not on the extractors.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pipeline.params import POSITIVE, BlockError

EXTRACTORS = {"ravdess": "ravdess", "vggsound50k": "vggsound", "crisismmd_v2": "crisismmd"}
EXTRACTED_ROOT = "data/extracted"     # extract@<key> writes data/extracted/<key>


@dataclass(frozen=True)
class ExtractRuntime:
    """How an extraction runs (the `extraction` block of params.yaml plus the run device).

    `weights: pretrained` loads every extractor's published weights from local files; `random_init` builds the
    same architectures with random weights (fixtures and smoke runs only: the features carry no meaning, and
    the extraction summary and the prepared summary say so)."""

    weights_dir: str = "weights"
    weights: Literal["pretrained", "random_init"] = "pretrained"
    batch_size: int = field(default=64, metadata=POSITIVE)
    progress: bool = True
    device: str = "auto"          # filled from the top-level `device` key by the stage
    cache_dir: str = "data/extract_cache"   # per-item resume cache (not a DVC output: survives a failed run)

    def torch_device(self) -> torch.device:
        from pipeline.training.runtime import resolve_device
        return resolve_device(self.device)


@dataclass(frozen=True)
class RavdessExtractParams:
    """RAVDESS extraction switches; the defaults are the authors' behaviour.

    windowing: `authors` = 15 frames from the first 108 of the clip, audio centre-cropped to 3.6 s (not
    time-aligned); `aligned` = frames and audio from the same centred 3.6 s window (see the module docstring).
    face_size: side of the square face crops (authors 224; smaller only for toy runs, e.g. the end-to-end
    test: the networks follow the input size)."""

    windowing: Literal["authors", "aligned"] = "authors"
    face_size: int = field(default=224, metadata=POSITIVE)


@dataclass(frozen=True)
class VGGSoundExtractParams:
    """VGGSound-50k extraction switches; the defaults are the authors' (AVE) behaviour.

    frames_per_second: frames sampled per 1-s segment and averaged (AVE: 16).
    id_slice: [start, stop) characters of a clip's file name holding the YouTube id (authors: [1, 12]).
    postprocess: VGGish PCA + 8-bit quantisation, like the released AudioSet/AVE embeddings (true), or the raw
    128-d embedding (false).
    short_clips: `pad` clips shorter than 10 s (last visual second repeated, silent audio) or `skip` them."""

    frames_per_second: int = field(default=16, metadata=POSITIVE)
    id_slice: list[int] = field(default_factory=lambda: [1, 12])
    postprocess: bool = True
    short_clips: Literal["pad", "skip"] = "pad"

    def validate(self) -> None:
        start, stop = (list(self.id_slice) + [None, None])[:2]
        if len(self.id_slice) != 2 or not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
            raise BlockError("id_slice", f"{self.id_slice!r}; expected [start, stop] with 0 <= start < stop")


@dataclass(frozen=True)
class CrisisExtractParams:
    """Switches of the CrisisMMD extraction; the defaults are the authors' behaviour.

    tsv_order: the order the split files are concatenated in (sets sample order and which duplicate survives);
        `dev_test_train` is the authors' (alphabetical `os.walk`), `train_dev_test` the publisher's.
    label_column: the TSV column holding the class name (the authors read `label`).
    fix_text, escape_round_trip, demojize, normalise_tweet: the four text cleaning steps, in that order.
    drop_tco_links: `https://t.co/…` tokens removed (the authors' addition to BERTweet's rules, which map every
        URL to HTTPURL); False maps them to HTTPURL too.
    dedup_tweet_id: keep only the first row of each tweet_id (authors); False keeps every image of a tweet.
    max_length: BERTweet token limit including <s> and </s> (authors 128; the model has 130 positions).
    image_size: the square Resize of every image before ResNet-50 (authors 224, aspect ratio not kept).
    init_seed: torch seed set before BERTweet is loaded (reproducible pooler weights when the checkpoint has
        none) and before random_init networks are built.
    random_init_layers: transformer layers of the random_init stand-in for BERTweet (features meaningless).
    """

    tsv_order: Literal["dev_test_train", "train_dev_test"] = "dev_test_train"
    label_column: Literal["label", "label_text", "label_image", "label_text_image"] = "label"
    fix_text: bool = True
    escape_round_trip: bool = True
    demojize: bool = True
    normalise_tweet: bool = True
    drop_tco_links: bool = True
    dedup_tweet_id: bool = True
    max_length: int = field(default=128, metadata=POSITIVE)
    image_size: int = field(default=224, metadata=POSITIVE)
    init_seed: int = 0
    random_init_layers: int = field(default=1, metadata=POSITIVE)


@dataclass(frozen=True)
class ExtractionParams:
    """The `extraction` block. `weights_dir`: where pretrained weight files are looked for first (then the
    torch.hub / Hugging Face caches). `weights`: `pretrained` (published weights, from local files only) or
    `random_init` (the same architectures, randomly initialised: fixtures and smoke runs; the features mean
    nothing and every summary says so). `batch_size`: items per extractor forward pass. `progress`: progress
    bars on stderr. `cache_dir`: the per-item resume cache (a re-run after a crash redoes only missing items).
    One sub-block of switches per dataset (defaults: the authors' preprocessing)."""

    weights_dir: str
    weights: Literal["pretrained", "random_init"]
    batch_size: int = field(metadata=POSITIVE)
    progress: bool
    cache_dir: str
    ravdess: RavdessExtractParams
    vggsound50k: VGGSoundExtractParams
    crisismmd_v2: CrisisExtractParams

    def runtime(self, device: str) -> ExtractRuntime:
        """The ExtractRuntime of these settings on `device`."""
        return ExtractRuntime(weights_dir=self.weights_dir, weights=self.weights, batch_size=self.batch_size,
                              progress=self.progress, device=device, cache_dir=self.cache_dir)


def extracted_folder(key: str) -> str:
    """The folder extract@<key> writes (and datasets.<key> must read)."""
    return f"{EXTRACTED_ROOT}/{key}"


def run_extraction(key: str, raw: Path, out: Path, params: ExtractionParams, device: str) -> dict:
    """Extract dataset `key` from the raw folder `raw` into `out`; returns the extraction summary."""
    if key not in EXTRACTORS:
        raise KeyError(f"no extraction for dataset {key!r}; datasets with one: {', '.join(EXTRACTORS)}")
    module = importlib.import_module(f"pipeline.extraction.{EXTRACTORS[key]}")
    return module.extract(Path(raw), Path(out), getattr(params, key), params.runtime(device))


def raw_layout(key: str) -> str:
    """What a user places in dataset `key`'s raw folder."""
    return importlib.import_module(f"pipeline.extraction.{EXTRACTORS[key]}").RAW_LAYOUT
