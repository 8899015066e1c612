"""A tiny CrisisMMD v2.0 release in the publisher's layout (humanitarian split TSVs + data_image/ JPEGs), and a
tiny BERTweet-shaped model folder as `save_pretrained` writes it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.crisismmd import CLASSES
from pipeline.extraction.common import ExtractRuntime

HEADER = ["event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "label_text", "label_image",
          "label_text_image"]
EVENTS = ("hurricane_harvey", "california_wildfires", "mexico_earthquake", "srilanka_floods")
# Tweets as the real files have them: mentions, t.co and other links, emoji, HTML entities, curly quotes,
# contractions, a quoted field with a doubled quote inside.
TEMPLATES = (
    "RT @HoustonTX: Flooding on I-45 &amp; Main St. Stay safe 🙏 https://t.co/Ab{k}x",
    "Volunteers needed at the shelter, we can't do it alone! Donate: www.redcross.org/{k} ❤️ #Harvey",
    "Houston’s roads are closed… It's 5 p.m. and the water's still rising https://t.co/Q{k}z",
    '"Power lines down" says @CALFIRE_{k} — don\'t go near them http://bit.ly/{k} 🔥',
    "Bridge collapsed near #Puebla 😢 I cannot believe it, they're all ok https://t.co/Zz{k}",
    "&lt;3 to everyone helping 💪 we'll rebuild #SriLankaFloods @UN",
)
BASE_ID = 905000000000000000


def write_raw_fixture(root: Path, n_per_class: int = 4, classes: tuple[int, ...] = (0, 2, 5, 7), seed: int = 0, *,
                      missing_image: bool = False, broken_image: bool = False, bad_label: bool = False) -> dict:
    """Write `n_per_class` tweets of each class in `classes` into the three humanitarian TSVs (round-robin train,
    dev, test) with one 64×48 JPEG each, plus two duplicate tweet_id rows (a second image of a train tweet in
    train, and a train tweet repeated in dev with another image: dev comes first, so that row is kept).
    Options: delete one kept row's image, overwrite one with non-JPEG bytes, or give one test row a label outside
    the class list. Returns the facts a test checks (rows per file, samples in output order, the spoilt items)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for k in range(n_per_class * len(classes)):
        label = classes[k % len(classes)]
        row = _row(root, k, BASE_ID + k, 0, label, rng)
        splits[("train", "dev", "test")[k % 3]].append(row)
    first_train = splits["train"][0]
    second = splits["train"][1]
    splits["dev"].insert(0, _row(root, 0, BASE_ID, 1, first_train["label_id"], rng))
    splits["train"].insert(2, _row(root, int(second["tweet_id"]) - BASE_ID, int(second["tweet_id"]), 1,
                                   second["label_id"], rng))
    facts: dict[str, Any] = {"root": root, "rows_per_file": {}, "duplicates": 2}
    if bad_label:
        splits["test"][1]["label"] = "flood_damage"
        facts["bad_label"] = ("task_humanitarian_text_img_test.tsv", 2, "flood_damage")
    for split, rows in splits.items():
        _write_tsv(root / f"task_humanitarian_text_img_{split}.tsv", rows)
        facts["rows_per_file"][f"task_humanitarian_text_img_{split}.tsv"] = len(rows)
    kept = _kept_in_order(splits)
    if missing_image:
        facts["missing"] = kept[3]["image"]
        (root / kept[3]["image"]).unlink()
    if broken_image:
        facts["broken"] = kept[5]["image"]
        (root / kept[5]["image"]).write_bytes(b"not a jpeg at all")
    spoilt = {facts.get("missing"), facts.get("broken")}
    facts["samples"] = [(row["tweet_id"], row["image"], int(row["label_id"])) for row in kept
                        if row["image"] not in spoilt]
    facts["texts"] = [row["tweet_text"] for row in kept if row["image"] not in spoilt]
    return facts


def _row(root: Path, k: int, tweet_id: int, image_no: int, label: int, rng: np.random.Generator) -> dict:
    event = EVENTS[k % len(EVENTS)]
    image = f"data_image/{event}/{10 + k % 3}_9_2017/{tweet_id}_{image_no}.jpg"
    _write_jpeg(root / image, label, rng)
    name = CLASSES[label]
    return {"event_name": event, "tweet_id": str(tweet_id), "image_id": f"{tweet_id}_{image_no}",
            "tweet_text": TEMPLATES[k % len(TEMPLATES)].format(k=k), "image": image, "label": name,
            "label_text": name, "label_image": name, "label_text_image": "Positive", "label_id": label}


def _write_jpeg(path: Path, label: int, rng: np.random.Generator) -> None:
    """A 64×48 RGB pattern: a class-dependent colour gradient with noise."""
    from PIL import Image
    ys, xs = np.mgrid[0:48, 0:64]
    base = np.stack([xs * 4, ys * 5, np.full_like(xs, 30 * label)], axis=-1)
    pixels = np.clip(base + rng.integers(0, 40, size=base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=85)


def _write_tsv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quotechar='"', lineterminator="\n")
        writer.writerow(HEADER)
        for row in rows:
            writer.writerow([row[column] for column in HEADER])


def _kept_in_order(splits: dict[str, list[dict]]) -> list[dict]:
    """The rows the authors keep, in their order: dev, test, train concatenated, first of each tweet_id."""
    seen, kept = set(), []
    for split in ("dev", "test", "train"):
        for row in splits[split]:
            if row["tweet_id"] not in seen:
                seen.add(row["tweet_id"])
                kept.append(row)
    return kept


def write_tiny_bertweet(folder: Path, *, with_pooler: bool = True, safetensors: bool = True, seed: int = 0) -> Path:
    """A BERTweet-shaped model folder as `save_pretrained` writes one (config.json, model weights, vocab.txt,
    bpe.codes, tokenizer config), one layer, random weights; `with_pooler=False` leaves out the pooler weights."""
    import torch
    from transformers import BertweetTokenizer, RobertaModel

    from pipeline.extraction.crisismmd import tiny_bertweet_config, write_tiny_tokenizer_files
    folder = Path(folder)
    write_tiny_tokenizer_files(folder)
    tokenizer = BertweetTokenizer(vocab_file=str(folder / "vocab.txt"), merges_file=str(folder / "bpe.codes"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    model = RobertaModel(tiny_bertweet_config(len(tokenizer), 1), add_pooling_layer=with_pooler)
    model.save_pretrained(folder, safe_serialization=safetensors)
    return folder


def tiny_runtime(tmp_path: Path, **changes) -> ExtractRuntime:
    """An extraction runtime for tests: random_init networks on the CPU, no progress bar, cache under tmp_path."""
    settings = {"weights_dir": str(Path(tmp_path) / "weights"), "weights": "random_init", "batch_size": 8,
                "progress": False, "device": "cpu", "cache_dir": str(Path(tmp_path) / "cache"), **changes}
    return ExtractRuntime(**settings)
