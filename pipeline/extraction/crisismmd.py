"""CrisisMMD v2.0 (humanitarian task) extraction: the publisher's TSVs and tweet images → the authors' feature file
(`CMMD_data.npz`, our pickle-free form of their `CMMD_data.pth`), as `preprocess_CrisisMMD_0.py` and `_1.py` build it.

Steps, in the authors' order:
1. read the three `task_humanitarian_text_img_*.tsv` files and concatenate them (dev, test, train: the order
   `os.walk` lists them on the authors' Windows machine, which is alphabetical);
2. clean every `tweet_text`: `ftfy.fix_text`; the authors' `\\u` escape round trip (see `escape_round_trip`);
   `emoji.demojize`; their BERTweet-style normaliser (see `normalise_tweet`);
3. drop rows whose `tweet_id` was seen before (the first row, hence the first image, is kept);
4. map the `label` column through the fixed class list (`pipeline.data.crisismmd.CLASSES`);
5. image features: torchvision ResNet-50 (IMAGENET1K_V1) without its fc layer, on PIL RGB → Resize((224, 224)) →
   ToTensor → ImageNet mean/std → 2048-d; text features: `vinai/bertweet-base` `pooler_output` of
   `encode(text, max_length=128, truncation=True)` → 768-d.

Where we differ from the authors (none of it changes a feature of a sample they could process):
- images and tweets are processed in batches (`runtime.batch_size`; texts padded with an attention mask, which
  gives the same pooler output as one at a time within float tolerance) instead of one at a time;
- a missing or unreadable JPEG drops that row from both modalities, logged and counted (the authors' script
  stops); a label outside the class list is an error naming file, row and value (the authors store -1);
- torch is seeded with `init_seed` before BERTweet is loaded, so pooler weights that the checkpoint lacks
  (transformers then initialises them randomly) are reproducible; the summary records whether they were loaded;
- the output keeps `tweet_id` in `all_data.tsv` (the authors drop it after de-duplicating).

TSVs are read with the csv module in the dialect pandas' `read_csv(sep='\\t')` uses: tab separated, `"` quotes a
field that starts with it (`""` inside is one quote), a quote inside an unquoted field is literal, blank lines are
skipped. pandas would turn a tweet text such as `NA` or an empty field into NaN (and ftfy then fails); we keep it
as text.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.crisismmd import CLASSES, FEATURE_FILE, IMAGE_DIM, ROWS_FILE, TEXT_DIM
from pipeline.data.validation import DataError
from pipeline.extraction.common import (AtomicFolder, ExtractRuntime, ItemCache, Stopwatch, WeightFile, WeightsError,
                                        find_weights, load_state_dict, progress, write_summary)
from pipeline.extraction.settings import CrisisExtractParams

KEY = "crisismmd_v2"
SPLITS = {"dev_test_train": ("dev", "test", "train"), "train_dev_test": ("train", "dev", "test")}
TSV_NAME = "task_humanitarian_text_img_{split}.tsv"
TSV_FOLDERS = (".", "crisismmd_datasplit_all")     # the zip unpacks into crisismmd_datasplit_all/
IMAGE_FOLDER = "data_image"
NEEDED_COLUMNS = ("tweet_id", "tweet_text", "image")
BERTWEET_FOLDER = "bertweet-base"
BERTWEET_HUB_ID = "vinai/bertweet-base"
BERTWEET_FILES = ("config.json", "vocab.txt", "bpe.codes")
BERTWEET_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODE_THREADS = 4          # JPEG decoding and resizing overlap in threads (PIL releases the GIL)

RAW_LAYOUT = ("data/raw/crisismmd_v2/ holds the three humanitarian-task split files of crisismmd_datasplit_all.zip, "
              "task_humanitarian_text_img_{train,dev,test}.tsv (directly or in crisismmd_datasplit_all/; tab-separated "
              "with columns event_name, tweet_id, image_id, tweet_text, image, label, label_text, label_image, "
              "label_text_image), and the data_image/ folder of CrisisMMD_v2.0.tar.gz "
              "(data_image/<event>/<date>/<tweet_id>_<k>.jpg), so that each TSV `image` path resolves against "
              "data/raw/crisismmd_v2/.")

RESNET50 = WeightFile(filename="resnet50-0676ba61.pth", sha256_prefix="0676ba61",
                      source="https://download.pytorch.org/models/resnet50-0676ba61.pth",
                      purpose="torchvision ResNet-50 IMAGENET1K_V1, CrisisMMD image features")
WEIGHTS: tuple[WeightFile, ...] = (RESNET50,)
BERTWEET_HINT = (f"save vinai/bertweet-base once where online (AutoModel.from_pretrained('{BERTWEET_HUB_ID}') and "
                 f"AutoTokenizer.from_pretrained(...), each .save_pretrained('<weights_dir>/{BERTWEET_FOLDER}')), "
                 "or point HF_HOME at a Hugging Face cache that holds it")


@dataclass(frozen=True)
class TweetRow:
    """One TSV row: where it came from, its raw fields and its class id."""

    source: str
    row: int
    tweet_id: str
    text: str
    image: str
    label: int


# ---------------------------------------------------------------- text cleaning (preprocess_CrisisMMD_0.py)

_SHORT_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4,6})")
# BERTweet's contraction and time fixes, applied in this order to the space-joined tokens (each a plain
# string replacement over the whole text, so "can't" ends as "can't" and "don't" as "do n't").
_TOKEN_FIXES = (("cannot ", "can not "), ("n't ", " n't "), ("n 't ", " n't "), ("ca n't", "can't"),
                ("ai n't", "ain't"), ("'m ", " 'm "), ("'re ", " 're "), ("'s ", " 's "), ("'ll ", " 'll "),
                ("'d ", " 'd "), ("'ve ", " 've "), (" p . m .", "  p.m."), (" p . m ", " p.m "),
                (" a . m .", " a.m."), (" a . m ", " a.m "))
_PUNCT = {"’": "'", "…": "..."}


def escape_round_trip(text: str) -> str:
    """The authors' escape/unescape round trip: write `text` with Python `unicode-escape`, widen every `\\u`
    followed by 4–6 hex digits to `\\U` + those digits zero-padded to 8, and decode again — only when a `\\u` or
    `\\U` is present, and keeping the escaped form when decoding fails. So text without such escapes keeps its
    escapes (a newline stays the two characters `\\n`, `é` stays `\\xe9`), and a BMP character followed by hex
    letters or digits is widened greedily (`–a` → U+2013A, `’ab` → invalid → the whole text stays escaped)."""
    escaped = _SHORT_ESCAPE.sub(lambda m: "\\U" + m.group(1).zfill(8), text.encode("unicode-escape").decode("utf-8"))
    if "\\u" not in escaped and "\\U" not in escaped:
        return escaped
    try:
        return escaped.encode("utf-8").decode("unicode-escape")
    except UnicodeDecodeError:
        return escaped


def normalise_token(token: str, drop_tco_links: bool = True) -> str:
    """One token the BERTweet way (plus the authors' t.co rule): @mention → @USER, t.co link → removed, other
    http/www token → HTTPURL, a single character → its emoji name, `\\'` → `'`, ’ → ', … → ..."""
    lowered = token.lower()
    if token.startswith("@"):
        return "@USER"
    if drop_tco_links and lowered.startswith("https://t.co/"):
        return ""
    if lowered.startswith(("http", "www")):
        return "HTTPURL"
    if len(token) == 1:
        import emoji
        return emoji.demojize(token)
    token = token.replace("\\'", "'")
    return _PUNCT.get(token, token)


def normalise_tweet(text: str, drop_tco_links: bool = True) -> str:
    """A tweet the BERTweet way: NLTK TweetTokenizer tokens (after `\\'` → `'`, ’ → ', … → ...), each through
    `normalise_token`, joined by spaces, contractions split (`do n't`, `it 's`, `can not`), `p . m .` → `p.m.`,
    whitespace collapsed."""
    text = text.replace("\\'", "'")
    for old, new in _PUNCT.items():
        text = text.replace(old, new)
    joined = " ".join(normalise_token(token, drop_tco_links) for token in _tweet_tokenizer().tokenize(text))
    joined = joined.replace("\\'", "'")
    for old, new in _TOKEN_FIXES:
        joined = joined.replace(old, new)
    return " ".join(joined.split())


def clean_text(text: str, params: CrisisExtractParams) -> str:
    """A tweet text through the authors' cleaning steps, each switchable: ftfy, escape round trip, demojize,
    BERTweet normaliser."""
    if params.fix_text:
        import ftfy
        text = ftfy.fix_text(text)
    if params.escape_round_trip:
        text = escape_round_trip(text)
    if params.demojize:
        import emoji
        text = emoji.demojize(text)
    if params.normalise_tweet:
        text = normalise_tweet(text, params.drop_tco_links)
    return text


@cache
def _tweet_tokenizer():
    """NLTK's TweetTokenizer with its defaults (case kept, handles kept), as BERTweet and the authors use it."""
    from nltk.tokenize import TweetTokenizer
    return TweetTokenizer()


# ---------------------------------------------------------------- the raw TSVs

def find_tsvs(raw: Path, params: CrisisExtractParams) -> list[Path]:
    """The three humanitarian split files in `params.tsv_order`; DataError naming the first one missing."""
    found = []
    for split in SPLITS[params.tsv_order]:
        name = TSV_NAME.format(split=split)
        candidates = [Path(raw) / folder / name for folder in TSV_FOLDERS]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{candidates[0]}: file not found (nor in {candidates[1].parent}/); expected the "
                            f"humanitarian split files of crisismmd_datasplit_all.zip. {RAW_LAYOUT}")
        found.append(path)
    return found


def read_tsv(path: Path, label_column: str = "label") -> list[TweetRow]:
    """The rows of one split file, in file order, with `label_column` mapped to its class id; DataError naming
    the file and column (missing column), or file, row and value (wrong field count, unknown label)."""
    class_ids = {name: index for index, name in enumerate(CLASSES)}
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quotechar='"', doublequote=True)
        header = next(reader, None) or []
        where = _column_positions(path, header, NEEDED_COLUMNS + (label_column,))
        rows = []
        for fields in reader:
            if not fields or fields == [""]:        # pandas skips blank lines
                continue
            number = len(rows) + 1
            if len(fields) != len(header):
                raise DataError(f"{path}: row {number} (line {reader.line_num}) has {len(fields)} tab-separated "
                                f"fields; expected {len(header)} like the header")
            label = fields[where[label_column]]
            if label not in class_ids:
                raise DataError(f"{path}: row {number} (line {reader.line_num}): {label_column} {label!r} is not a "
                                f"humanitarian class; expected one of {', '.join(CLASSES)}")
            rows.append(TweetRow(source=path.name, row=number, tweet_id=fields[where["tweet_id"]].strip(),
                                 text=fields[where["tweet_text"]], image=fields[where["image"]].strip(),
                                 label=class_ids[label]))
    return rows


def _column_positions(path: Path, header: list[str], needed: Sequence[str]) -> dict[str, int]:
    names = [name.strip() for name in header]
    for column in needed:
        if column not in names:
            raise DataError(f"{path}: column {column!r} missing from the header (has {', '.join(names) or 'nothing'});"
                            f" expected the columns of crisismmd_datasplit_all")
    return {column: names.index(column) for column in needed}


def drop_duplicate_tweets(rows: Sequence[TweetRow]) -> tuple[list[TweetRow], int]:
    """Rows with a tweet_id not seen before (the first occurrence kept, as pandas `drop_duplicates(keep='first')`
    on the integer column) and how many were dropped."""
    seen: set[Any] = set()
    kept = []
    for row in rows:
        key = int(row.tweet_id) if row.tweet_id.isdigit() else row.tweet_id
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


# ---------------------------------------------------------------- extractors

def build_image_encoder(runtime: ExtractRuntime, seed: int) -> tuple[torch.nn.Module, str]:
    """ResNet-50 without its fc layer (output (B, 2048, 1, 1)), with the IMAGENET1K_V1 weights or random ones,
    in eval mode on the run device; and a description of its weights."""
    from torchvision.models import resnet50
    path = find_weights(RESNET50, runtime.weights_dir) if runtime.weights == "pretrained" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = resnet50(weights=None)
    if path is not None:
        net.load_state_dict(load_state_dict(path))
    described = "random_init" if path is None else str(path)
    trunk = torch.nn.Sequential(*list(net.children())[:-1])
    return trunk.eval().to(runtime.torch_device()), described


def image_transform(size: int):
    """The authors' image preprocessing: Resize((size, size)) → ToTensor → ImageNet mean/std."""
    from torchvision import transforms
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                               transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


@dataclass
class TextEncoder:
    """BERTweet (or its random_init stand-in) with its tokenizer, and where its weights came from."""

    model: Any
    tokenizer: Any
    source: str
    pooler: str          # "pretrained", "random (missing from the checkpoint, seeded)" or "random_init"


def bertweet_cache_dir() -> Path:
    """The Hugging Face hub cache transformers would use: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (read at call time, so a test can point it elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def bertweet_source(weights_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """Where BERTweet loads from: `<weights_dir>/bertweet-base/` when it exists (all its files checked), else the
    HF cache when it holds vinai/bertweet-base; WeightsError naming the folder and files otherwise. Returns the
    name to pass to from_pretrained and its keyword arguments (always local_files_only)."""
    folder = Path(weights_dir) / BERTWEET_FOLDER
    expected = f"{', '.join(BERTWEET_FILES)} and {' or '.join(BERTWEET_WEIGHT_FILES)}"
    if folder.is_dir():
        missing = [name for name in BERTWEET_FILES if not (folder / name).is_file()]
        if not any((folder / name).is_file() for name in BERTWEET_WEIGHT_FILES):
            missing.append(" or ".join(BERTWEET_WEIGHT_FILES))
        if missing:
            raise WeightsError(f"{folder}: {', '.join(missing)} missing; expected {expected} (BERTweet-base, "
                               f"CrisisMMD text features); {BERTWEET_HINT}")
        return str(folder), {"local_files_only": True,
                             "use_safetensors": (folder / BERTWEET_WEIGHT_FILES[0]).is_file()}
    cache = bertweet_cache_dir()
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(BERTWEET_HUB_ID, "config.json", cache_dir=cache), str):
        return BERTWEET_HUB_ID, {"local_files_only": True, "cache_dir": str(cache)}
    raise WeightsError(f"{folder}: BERTweet folder not found (nor {BERTWEET_HUB_ID} in the HF cache {cache}); "
                       f"expected {expected} there (CrisisMMD text features); {BERTWEET_HINT}")


def load_text_encoder(runtime: ExtractRuntime, params: CrisisExtractParams) -> TextEncoder:
    """BERTweet-base from local files (pretrained) or a tiny BERTweet-shaped stand-in (random_init), in eval mode
    on the run device, torch seeded with `init_seed` first; logs whether the checkpoint carries pooler weights."""
    if runtime.weights == "random_init":
        encoder = build_tiny_bertweet(params.init_seed, params.random_init_layers)
    else:
        encoder = _load_bertweet(runtime.weights_dir, params.init_seed)
        print(f"crisismmd_v2: BERTweet from {encoder.source}: pooler weights {encoder.pooler}", file=sys.stderr)
    encoder.model.eval().to(runtime.torch_device())
    return encoder


def _load_bertweet(weights_dir: str | Path, seed: int) -> TextEncoder:
    name, options = bertweet_source(weights_dir)
    from transformers import BertweetTokenizer, RobertaModel
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, info = RobertaModel.from_pretrained(name, output_loading_info=True, **options)
        tokenizer_options = {key: value for key, value in options.items() if key != "use_safetensors"}
        tokenizer = BertweetTokenizer.from_pretrained(name, **tokenizer_options)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{name}: BERTweet could not be loaded from local files ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); {BERTWEET_HINT}") from None
    pooler_missing = any("pooler" in key for key in info.get("missing_keys", ()))
    pooler = "random (missing from the checkpoint; initialised after torch.manual_seed(init_seed))" \
        if pooler_missing else "pretrained"
    return TextEncoder(model=model, tokenizer=tokenizer, source=name, pooler=pooler)


def write_tiny_tokenizer_files(folder: Path) -> None:
    """A tiny BertweetTokenizer vocabulary (`vocab.txt`: every printable ASCII character as a word end and as a
    word piece `x@@`, plus @USER, HTTPURL and a few merged pieces) and its BPE merges (`bpe.codes`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = [("t", "h"), ("th", "e</w>"), ("e", "r"), ("i", "n"), ("o", "n</w>"), ("a", "n"), ("r", "e")]
    chars = [chr(code) for code in range(33, 127)]
    pieces = [f"{c}@@" for c in chars] + chars + ["@USER", "HTTPURL", "th@@", "the", "er@@", "in@@", "on", "an@@",
                                                    "re@@"]
    (folder / "vocab.txt").write_text("".join(f"{piece} 1\n" for piece in dict.fromkeys(pieces)), encoding="utf-8")
    (folder / "bpe.codes").write_text("".join(f"{a} {b} 1\n" for a, b in merges), encoding="utf-8")


def tiny_bertweet_config(vocab_size: int, layers: int):
    """A BERTweet-base-shaped RoBERTa configuration with few layers: hidden 768, 12 heads, 130 positions, pad
    id 1 (RoBERTa's position ids start after it), one token type, as vinai/bertweet-base's config."""
    from transformers import RobertaConfig
    return RobertaConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, num_hidden_layers=layers,
                         num_attention_heads=12, intermediate_size=3072, max_position_embeddings=130,
                         type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)


def build_tiny_bertweet(seed: int, layers: int = 1) -> TextEncoder:
    """The random_init stand-in for BERTweet: a tiny BertweetTokenizer (files written to a temporary folder) and
    a BERTweet-shaped RobertaModel with `layers` layers and random weights (seeded). Its features carry no
    meaning."""
    from transformers import BertweetTokenizer, RobertaModel
    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer_files(Path(folder))
        tokenizer = BertweetTokenizer(vocab_file=str(Path(folder) / "vocab.txt"),
                                      merges_file=str(Path(folder) / "bpe.codes"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RobertaModel(tiny_bertweet_config(len(tokenizer), layers))
    return TextEncoder(model=model, tokenizer=tokenizer, source="random_init (tiny BERTweet-shaped)",
                       pooler="random_init")


def text_features(encoder: TextEncoder, texts: Sequence[str], max_length: int) -> np.ndarray:
    """BERTweet pooler outputs (len(texts), 768) of one batch: each text encoded as the authors
    (`encode(text, max_length, truncation)`), right-padded with the pad id and masked."""
    ids = [encoder.tokenizer.encode(text, max_length=max_length, truncation=True) for text in texts]
    width = max(len(seq) for seq in ids)
    pad = encoder.tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for index, seq in enumerate(ids):
        input_ids[index, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[index, :len(seq)] = 1
    device = next(encoder.model.parameters()).device
    with torch.no_grad():
        out = encoder.model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    return out.pooler_output.float().cpu().numpy()


def image_features(net: torch.nn.Module, images: Sequence[torch.Tensor]) -> np.ndarray:
    """ResNet-50 global-average-pool features (len(images), 2048) of one batch of preprocessed images."""
    device = next(net.parameters()).device
    with torch.no_grad():
        out = net(torch.stack(list(images)).to(device))
    return out.flatten(1).float().cpu().numpy()


def load_image(path: Path, transform) -> torch.Tensor | str:
    """The preprocessed image tensor, or a one-line reason it could not be read."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"unreadable image ({type(err).__name__}: {err})"


# ---------------------------------------------------------------- the extraction

def read_rows(raw: Path, params: CrisisExtractParams) -> tuple[list[TweetRow], dict[str, Any]]:
    """All rows of the split files in order, de-duplicated (when switched on), and counts for the summary."""
    rows: list[TweetRow] = []
    per_file = {}
    for path in find_tsvs(raw, params):
        file_rows = read_tsv(path, params.label_column)
        per_file[path.name] = len(file_rows)
        rows.extend(file_rows)
    dropped = 0
    if params.dedup_tweet_id:
        rows, dropped = drop_duplicate_tweets(rows)
    if not rows:
        raise DataError(f"{raw}: the humanitarian split files hold no rows; expected {RAW_LAYOUT}")
    return rows, {"rows_per_file": per_file, "duplicate_tweet_ids_dropped": dropped}


def extract(raw: Path, out: Path, params: CrisisExtractParams, runtime: ExtractRuntime) -> dict:
    """Turn the CrisisMMD release under `raw` into `out/CMMD_data.npz` (image (N, 2048), text (N, 768) float32,
    labels (N,) int64), `out/all_data.tsv` (the cleaned text, image path, label and tweet_id of each sample) and
    `out/extraction.json`; returns that summary. Rows whose image is missing or unreadable are dropped from both
    modalities, logged and counted."""
    raw, out = Path(raw), Path(out)
    if not (raw / IMAGE_FOLDER).is_dir():
        raise DataError(f"{raw / IMAGE_FOLDER}: folder not found; expected the data_image/ folder of "
                        f"CrisisMMD_v2.0.tar.gz. {RAW_LAYOUT}")
    rows, counts = read_rows(raw, params)
    skipped = {i: "image file not found" for i, row in enumerate(rows) if not (raw / row.image).is_file()}
    if runtime.weights == "pretrained":      # both weight sources checked before either network is built
        find_weights(RESNET50, runtime.weights_dir)
        bertweet_source(runtime.weights_dir)
    image_net, image_weights = build_image_encoder(runtime, params.init_seed)
    encoder = load_text_encoder(runtime, params)
    cache = ItemCache(Path(runtime.cache_dir) / KEY, _cache_settings(params, runtime, image_weights, encoder))
    watch = Stopwatch()
    texts = [clean_text(row.text, params) for row in rows]
    features = _compute(rows, raw, texts, skipped, image_net, encoder, cache, params, runtime)
    kept = [i for i in range(len(rows)) if i in features]
    if not kept:
        raise DataError(f"{raw}: no row has a readable image; expected the JPEGs of {IMAGE_FOLDER}/")
    summary = _summary([rows[i] for i in kept], counts, [rows[i].image for i in skipped], list(skipped.values()),
                       watch, cache, image_weights, encoder, params, runtime)
    with AtomicFolder(out) as folder:
        np.savez(folder / FEATURE_FILE, image=np.stack([features[i]["image"] for i in kept]).astype(np.float32),
                 text=np.stack([features[i]["text"] for i in kept]).astype(np.float32),
                 labels=np.array([rows[i].label for i in kept], dtype=np.int64))
        _write_rows(folder / ROWS_FILE, [rows[i] for i in kept], [texts[i] for i in kept])
        write_summary(folder, summary)
    return summary


def _compute(rows, raw, texts, skipped, image_net, encoder, cache, params, runtime) -> dict[int, dict]:
    """Features of every row with a readable image, by row position (cached rows read back, the rest computed in
    batches); rows with an unreadable image are added to `skipped`, and every skip is logged."""
    transform = image_transform(params.image_size)
    features: dict[int, dict] = {}
    pending = []
    for i, row in enumerate(rows):
        if i in skipped:
            continue
        fingerprint = _fingerprint(raw / row.image, texts[i])
        hit = cache.get(row.image, fingerprint)
        if hit is not None:
            features[i] = hit
        else:
            pending.append((i, fingerprint))
    batches = list(_batches(pending, runtime.batch_size))
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for batch in progress(batches, len(batches), "crisismmd_v2 batches", runtime.progress):
            loaded = list(pool.map(lambda item: load_image(raw / rows[item[0]].image, transform), batch))
            good = [(item, tensor) for item, tensor in zip(batch, loaded) if not isinstance(tensor, str)]
            skipped.update({item[0]: tensor for item, tensor in zip(batch, loaded) if isinstance(tensor, str)})
            if good:
                _compute_batch(good, rows, texts, image_net, encoder, cache, params, features)
    for i, reason in sorted(skipped.items()):
        print(f"crisismmd_v2: skipped {raw / rows[i].image} ({rows[i].source} row {rows[i].row}): {reason}",
              file=sys.stderr)
    return features


def _compute_batch(good, rows, texts, image_net, encoder, cache, params, features) -> None:
    images = image_features(image_net, [tensor for _, tensor in good])
    words = text_features(encoder, [texts[i] for (i, _), _ in good], params.max_length)
    for index, ((i, fingerprint), _) in enumerate(good):
        result = {"image": images[index], "text": words[index]}
        cache.put(rows[i].image, fingerprint, result)
        features[i] = result


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _fingerprint(image: Path, text: str) -> str:
    """What a row's features depend on besides the settings: the image file (size, mtime) and the cleaned text."""
    return hashlib.sha256(f"{ItemCache.file_fingerprint(image)}|{text}".encode()).hexdigest()[:16]


def _cache_settings(params, runtime, image_weights: str, encoder: TextEncoder) -> dict[str, Any]:
    return {"params": asdict(params), "weights": runtime.weights, "image_weights": image_weights,
            "text_source": encoder.source, "device": str(runtime.torch_device().type)}


def _write_rows(path: Path, rows: Sequence[TweetRow], texts: Sequence[str]) -> None:
    """The authors' all_data.csv columns (tweet_text, image, label name) plus tweet_id, tab-separated, quoted as
    pandas `to_csv` does (only fields that need it)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quotechar='"', quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(["tweet_text", "image", "label", "tweet_id"])
        for row, text in zip(rows, texts):
            writer.writerow([text, row.image, CLASSES[row.label], row.tweet_id])


def _summary(kept, counts, skipped_images, reasons, watch, cache, image_weights, encoder, params, runtime) -> dict:
    by_reason = Counter(reason if reason == "image file not found" else "unreadable image" for reason in reasons)
    return {
        "dataset": KEY, "items": len(kept), **counts,
        "skipped": {"total": len(reasons), "by_reason": dict(by_reason),
                    "examples": [f"{image}: {reason}" for image, reason in list(zip(skipped_images, reasons))[:10]]},
        "fallbacks": [] if encoder.source != BERTWEET_HUB_ID else ["BERTweet read from the Hugging Face cache"],
        "weights": runtime.weights, "image_weights": image_weights, "text_weights": encoder.source,
        "text_pooler_weights": encoder.pooler,
        "features_meaningful": runtime.weights == "pretrained",
        "class_counts": np.bincount([row.label for row in kept], minlength=len(CLASSES)).tolist(),
        "classes": list(CLASSES),
        "shapes": {"image": [len(kept), IMAGE_DIM], "text": [len(kept), TEXT_DIM], "labels": [len(kept)]},
        "cache": {"hits": cache.hits, "misses": cache.misses},
        "throughput": watch.report(len(kept)), "params": asdict(params), "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    """Versions of the packages that shape the text (cleaning and tokenisation change the features)."""
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("ftfy", "emoji", "nltk", "transformers", "torch", "torchvision", "Pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
