"""CrisisMMD v2.0 extraction and loader: the authors' text cleaning rule by rule, their TSV reading, de-duplication
and label map, ResNet-50 / BERTweet features of the right shapes (random_init networks of the real architectures),
skips that keep both modalities aligned, resume, one-line errors naming the file."""

from __future__ import annotations

import dataclasses
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import csv  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.data import crisismmd as loader  # noqa: E402
from pipeline.data.validation import DataError  # noqa: E402
from pipeline.extraction.common import WeightsError  # noqa: E402
from pipeline.extraction.crisismmd import (CrisisExtractParams, TweetRow, build_image_encoder,  # noqa: E402
                                           clean_text, drop_duplicate_tweets, escape_round_trip, extract,
                                           load_text_encoder, normalise_token, normalise_tweet, read_tsv,
                                           text_features)
from tests.raw_fixtures.crisismmd import tiny_runtime, write_raw_fixture, write_tiny_bertweet  # noqa: E402

PARAMS = CrisisExtractParams()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The clean fixture release, extracted once with random_init networks."""
    base = tmp_path_factory.mktemp("crisis")
    facts = write_raw_fixture(base / "raw")
    runtime = tiny_runtime(base)
    summary = extract(base / "raw", base / "out", PARAMS, runtime)
    return {"facts": facts, "out": base / "out", "summary": summary, "runtime": runtime, "base": base}


@pytest.fixture(scope="module")
def spoilt(tmp_path_factory):
    """A release with one image deleted and one replaced by non-JPEG bytes, extracted once (stderr captured)."""
    base = tmp_path_factory.mktemp("crisis_spoilt")
    facts = write_raw_fixture(base / "raw", missing_image=True, broken_image=True)
    summary = extract(base / "raw", base / "out", PARAMS, tiny_runtime(base))
    return {"facts": facts, "out": base / "out", "summary": summary}


@pytest.fixture(scope="module")
def bertweet_folders(tmp_path_factory):
    """Tiny BERTweet-shaped model folders as save_pretrained writes them: with pooler (safetensors) and without
    pooler (pytorch_model.bin)."""
    base = tmp_path_factory.mktemp("bertweet")
    write_tiny_bertweet(base / "with_pooler" / "weights" / "bertweet-base", with_pooler=True, safetensors=True)
    write_tiny_bertweet(base / "no_pooler" / "weights" / "bertweet-base", with_pooler=False, safetensors=False)
    return base


def _rows_file(folder):
    with open(folder / "all_data.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


# ---------------------------------------------------------------- text cleaning, rule by rule

@pytest.mark.parametrize("token, expected", [
    ("@FEMA", "@USER"), ("@", "@USER"),
    ("https://t.co/Ab1x", ""), ("HTTPS://T.CO/Ab1x", ""),               # the authors drop t.co links
    ("http://t.co/Ab1x", "HTTPURL"), ("http://bit.ly/x", "HTTPURL"), ("www.redcross.org", "HTTPURL"),
    ("😭", ":loudly_crying_face:"), ("a", "a"), ("’", "’"),              # one character: demojised only
    ("don\\'t", "don't"), ("…!", "…!"), ("Houston", "Houston"),
])
def test_normalise_token(token, expected):
    assert normalise_token(token) == expected


def test_tco_links_map_to_httpurl_when_switched_off():
    assert normalise_token("https://t.co/Ab1x", drop_tco_links=False) == "HTTPURL"


@pytest.mark.parametrize("tweet, expected", [
    ("I don't know", "I do n't know"),
    ("I don't", "I don't"),                          # the fixes need a following space: a final "don't" stays
    ("we can't go", "we can't go"),                  # split to "ca n't", then glued back
    ("I cannot go", "I can not go"),
    ("ain't right", "ain't right"),
    ("I'm sure it's they're we'll I'd we've done",
     "I 'm sure it 's they 're we 'll I 'd we 've done"),
    ("Houston’s roads…", "Houston 's roads ..."),    # ’ → ' and … → ... before tokenising
    ("don\\'t go", "do n't go"),                     # a literal backslash-quote is a quote
    ("at 5 p . m . today", "at 5 p.m. today"),
    ("RT @HoustonTX: flood https://t.co/Ab1 http://bit.ly/x", "RT @USER : flood HTTPURL"),
    ("  spaced \t out  ", "spaced out"),
])
def test_normalise_tweet(tweet, expected):
    assert normalise_tweet(tweet) == expected


@pytest.mark.parametrize("text, expected", [
    ("Café 😭", "Café 😭"),                           # an astral escape (\U0001f62d) present: decoded back
    ("Café after", "Caf\\xe9 after"),                 # no \u or \U escape: the escaped form is kept (authors)
    ("line\nbreak", "line\\nbreak"),
    ("dash –a", "dash \U0002013a"),                   # \u2013 + hex 'a' is widened greedily to U+2013A
    ("’ab 😭", "\\U002019ab \\U0001f62d"),             # widened to an invalid code point: stays escaped
])
def test_escape_round_trip_keeps_the_authors_quirks(text, expected):
    assert escape_round_trip(text) == expected


def test_clean_text_runs_ftfy_roundtrip_demojize_normaliser_in_order():
    tweet = "RT @HoustonTX: Flooding &amp; rain 😭 at Houstonâ€™s I-45 https://t.co/Ab1 see http://bit.ly/x"
    assert clean_text(tweet, PARAMS) == ("RT @USER : Flooding & rain : loudly_crying_face : at Houston 's I - 45 "
                                         "see HTTPURL")
    assert clean_text("Café after", dataclasses.replace(PARAMS, escape_round_trip=False)) == "Café after"
    raw = dataclasses.replace(PARAMS, fix_text=False, escape_round_trip=False, demojize=False, normalise_tweet=False)
    assert clean_text(tweet, raw) == tweet


# ---------------------------------------------------------------- TSVs, duplicates, labels

def test_class_list_is_the_authors_order():
    assert loader.CLASSES == ("not_humanitarian", "affected_individuals", "infrastructure_and_utility_damage",
                              "injured_or_dead_people", "missing_or_found_people",
                              "rescue_volunteering_or_donation_effort", "vehicle_damage", "other_relevant_information")


def test_read_tsv_follows_pandas_quoting_and_maps_labels(tmp_path):
    path = tmp_path / "task_humanitarian_text_img_dev.tsv"
    header = "event_name\ttweet_id\timage_id\ttweet_text\timage\tlabel\tlabel_text\tlabel_image\tlabel_text_image\n"
    lines = ['ev\t1\t1_0\the said "hi" ok\tdata_image/a/1_0.jpg\tvehicle_damage\tx\tx\tx\n',
             '\n',                                                       # blank lines are skipped
             'ev\t2\t2_0\t"""Quoted"" start\twith tab"\tdata_image/a/2_0.jpg\tnot_humanitarian\tx\tx\tx\n']
    path.write_text("\ufeff" + header + "".join(lines), encoding="utf-8")
    rows = read_tsv(path)
    assert [(r.tweet_id, r.text, r.label, r.row) for r in rows] == [
        ("1", 'he said "hi" ok', 6, 1), ("2", '"Quoted" start\twith tab', 0, 2)]
    assert rows[0].image == "data_image/a/1_0.jpg"


def test_duplicates_keep_the_first_row():
    rows = [TweetRow("a.tsv", 1, "0123", "t", "i1", 0), TweetRow("a.tsv", 2, "7", "t", "i2", 1),
            TweetRow("b.tsv", 1, "123", "t", "i3", 2), TweetRow("b.tsv", 2, "7", "t", "i4", 3)]
    kept, dropped = drop_duplicate_tweets(rows)
    assert [r.image for r in kept] == ["i1", "i2"] and dropped == 2     # ids compare as integers (pandas)


def test_bad_label_names_file_row_and_value(tmp_path):
    facts = write_raw_fixture(tmp_path / "raw", bad_label=True)
    name, row, value = facts["bad_label"]
    with pytest.raises(DataError, match=rf"{name}: row {row} .*'{value}'"):
        extract(tmp_path / "raw", tmp_path / "out", PARAMS, tiny_runtime(tmp_path))
    assert not (tmp_path / "out").exists()


def test_missing_column_names_file_and_column(tmp_path):
    write_raw_fixture(tmp_path / "raw")
    path = tmp_path / "raw" / "task_humanitarian_text_img_test.tsv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0].replace("\timage\t", "\tpicture\t") + "".join(lines[1:]), encoding="utf-8")
    with pytest.raises(DataError, match=r"task_humanitarian_text_img_test\.tsv: column 'image' missing"):
        extract(tmp_path / "raw", tmp_path / "out", PARAMS, tiny_runtime(tmp_path))


def test_missing_tsv_and_image_folder_name_the_path(tmp_path):
    write_raw_fixture(tmp_path / "raw")
    (tmp_path / "raw" / "task_humanitarian_text_img_train.tsv").unlink()
    with pytest.raises(DataError, match=r"task_humanitarian_text_img_train\.tsv: file not found"):
        extract(tmp_path / "raw", tmp_path / "out", PARAMS, tiny_runtime(tmp_path))
    shutil.rmtree(tmp_path / "raw" / "data_image")
    with pytest.raises(DataError, match=r"data_image: folder not found"):
        extract(tmp_path / "raw", tmp_path / "out", PARAMS, tiny_runtime(tmp_path))


# ---------------------------------------------------------------- extraction output

def test_extraction_shapes_dtypes_and_ranges(release):
    with np.load(release["out"] / "CMMD_data.npz", allow_pickle=False) as data:
        image, text, labels = data["image"], data["text"], data["labels"]
    assert image.shape == (16, 2048) and image.dtype == np.float32
    assert text.shape == (16, 768) and text.dtype == np.float32
    assert labels.shape == (16,) and labels.dtype == np.int64
    assert image.min() >= 0 and image.max() > 0            # ReLU then average pool
    assert np.abs(text).max() <= 1                          # pooler = tanh
    assert release["summary"]["shapes"] == {"image": [16, 2048], "text": [16, 768], "labels": [16]}


def test_extraction_order_dedup_and_labels(release):
    facts, summary = release["facts"], release["summary"]
    rows = _rows_file(release["out"])
    assert [(r["tweet_id"], r["image"]) for r in rows] == [(t, i) for t, i, _ in facts["samples"]]
    # the train tweet repeated in dev comes first in dev (dev, test, train order): its second image is kept
    assert rows[0]["image"].endswith("905000000000000000_1.jpg")
    with np.load(release["out"] / "CMMD_data.npz", allow_pickle=False) as data:
        assert data["labels"].tolist() == [label for _, _, label in facts["samples"]]
    assert [loader.CLASSES.index(r["label"]) for r in rows] == [label for _, _, label in facts["samples"]]
    assert summary["duplicate_tweet_ids_dropped"] == 2 and summary["items"] == 16
    assert summary["rows_per_file"] == facts["rows_per_file"]
    assert summary["class_counts"] == [4, 0, 4, 0, 0, 4, 0, 4]
    assert rows[0]["tweet_text"] == "RT @USER : Flooding on I - 45 & Main St . Stay safe : folded_hands :"
    assert summary["weights"] == "random_init" and summary["features_meaningful"] is False


def test_image_encoder_is_resnet50_without_fc(tmp_path):
    net, weights = build_image_encoder(tiny_runtime(tmp_path), seed=0)
    assert weights == "random_init"
    assert sum(p.numel() for p in net.parameters()) == 25_557_032 - (2048 * 1000 + 1000)
    with torch.no_grad():
        assert tuple(net(torch.zeros(2, 3, 224, 224)).shape) == (2, 2048, 1, 1)


def test_missing_and_unreadable_images_are_skipped_in_both_modalities(spoilt, release):
    facts, summary = spoilt["facts"], spoilt["summary"]
    assert summary["items"] == 14
    assert summary["skipped"]["by_reason"] == {"image file not found": 1, "unreadable image": 1}
    rows = _rows_file(spoilt["out"])
    assert [(r["tweet_id"], r["image"]) for r in rows] == [(t, i) for t, i, _ in facts["samples"]]
    with np.load(spoilt["out"] / "CMMD_data.npz", allow_pickle=False) as data:
        assert len(data["image"]) == len(data["text"]) == 14
        assert data["labels"].tolist() == [label for _, _, label in facts["samples"]]
        images = data["image"]
    with np.load(release["out"] / "CMMD_data.npz", allow_pickle=False) as data:
        clean_images = {row["image"]: data["image"][k] for k, row in enumerate(_rows_file(release["out"]))}
    # the same image has the same features (same seeded network), so pairs are not shifted
    np.testing.assert_allclose(images, np.stack([clean_images[r["image"]] for r in rows]), rtol=1e-5, atol=1e-5)
    assert any(facts["missing"] in line for line in summary["skipped"]["examples"])
    assert any(facts["broken"] in line and "unreadable" in line for line in summary["skipped"]["examples"])


def test_skips_are_logged_one_line_each(tmp_path, capfd):
    facts = write_raw_fixture(tmp_path / "raw", missing_image=True)
    extract(tmp_path / "raw", tmp_path / "out", PARAMS, tiny_runtime(tmp_path, batch_size=16))
    lines = [line for line in capfd.readouterr().err.splitlines() if "skipped" in line]
    assert len(lines) == 1 and facts["missing"] in lines[0] and "image file not found" in lines[0]


def test_resumed_extraction_reuses_the_cache(release):
    base = release["base"]
    again = extract(base / "raw", base / "again", PARAMS, release["runtime"])
    assert again["cache"] == {"hits": 16, "misses": 0}
    for name in ("CMMD_data.npz",):
        with np.load(release["out"] / name) as first, np.load(base / "again" / name) as second:
            for key in ("image", "text", "labels"):
                np.testing.assert_array_equal(first[key], second[key])
    assert (release["out"] / "all_data.tsv").read_text() == (base / "again" / "all_data.tsv").read_text()


# ---------------------------------------------------------------- pretrained weights

def test_missing_resnet_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    write_raw_fixture(tmp_path / "raw")
    runtime = tiny_runtime(tmp_path, weights="pretrained")
    with pytest.raises(WeightsError, match=r"resnet50-0676ba61\.pth not found"):
        extract(tmp_path / "raw", tmp_path / "out", PARAMS, runtime)


def test_missing_bertweet_folder_is_a_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    runtime = tiny_runtime(tmp_path, weights="pretrained")
    with pytest.raises(WeightsError, match=r"bertweet-base: BERTweet folder not found.*save_pretrained"):
        load_text_encoder(runtime, PARAMS)
    write_tiny_bertweet(tmp_path / "weights" / "bertweet-base")
    (tmp_path / "weights" / "bertweet-base" / "bpe.codes").unlink()
    with pytest.raises(WeightsError, match=r"bertweet-base: bpe\.codes missing"):
        load_text_encoder(runtime, PARAMS)


def test_pooler_presence_is_recorded_and_seeded(bertweet_folders, capfd):
    with_pooler = load_text_encoder(tiny_runtime(bertweet_folders / "with_pooler", weights="pretrained"), PARAMS)
    assert with_pooler.pooler == "pretrained"
    assert "pooler weights pretrained" in capfd.readouterr().err
    runtime = tiny_runtime(bertweet_folders / "no_pooler", weights="pretrained")
    first, second = load_text_encoder(runtime, PARAMS), load_text_encoder(runtime, PARAMS)
    assert first.pooler.startswith("random (missing from the checkpoint")
    assert "pooler weights random" in capfd.readouterr().err
    # seeded before loading: the randomly initialised pooler is the same in every run
    torch.testing.assert_close(first.model.pooler.dense.weight, second.model.pooler.dense.weight, rtol=0, atol=0)
    other = load_text_encoder(runtime, dataclasses.replace(PARAMS, init_seed=1))
    assert not torch.equal(first.model.pooler.dense.weight, other.model.pooler.dense.weight)


def test_batched_text_features_equal_one_at_a_time(bertweet_folders):
    encoder = load_text_encoder(tiny_runtime(bertweet_folders / "with_pooler", weights="pretrained"), PARAMS)
    texts = ["RT @USER : Flooding & rain : loudly_crying_face : HTTPURL", "help", "the water is still rising " * 40]
    batched = text_features(encoder, texts, 128)
    single = np.concatenate([text_features(encoder, [text], 128) for text in texts])
    assert batched.shape == (3, 768)
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    ids = encoder.tokenizer.encode(texts[2], max_length=128, truncation=True)
    assert len(ids) == 128 and ids[0] == 0 and ids[-1] == 2          # <s> … </s>, truncated to 128
    assert encoder.model.config.max_position_embeddings == 130 and encoder.model.config.pad_token_id == 1
    assert encoder.model.config.hidden_size == 768 and encoder.model.config.num_attention_heads == 12


# ---------------------------------------------------------------- loader

def test_loader_returns_features_unnormalised_with_summary(release):
    data = loader.load(release["out"])
    with np.load(release["out"] / "CMMD_data.npz") as stored:
        np.testing.assert_array_equal(data["m1"], stored["image"])
        np.testing.assert_array_equal(data["m2"], stored["text"])
    assert data["m1"].shape == (16, 2048) and data["m2"].shape == (16, 768)
    assert data["m1"].dtype == data["m2"].dtype == np.float32 and data["labels"].dtype == np.int64
    assert data["summary"]["extraction"]["items"] == 16


def _write_npz(folder, image, text, labels):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "CMMD_data.npz", image=image, text=text, labels=labels)
    return folder / "CMMD_data.npz"


@pytest.mark.parametrize("change, message", [
    ({"labels": np.array([0, 8, 1])}, r"CMMD_data\.npz: label 8 at row 1 is outside 0\.\.7"),
    ({"text": np.zeros((2, 768), np.float32)}, r"CMMD_data\.npz: text has 2 rows but labels has 3"),
    ({"image": np.zeros((3, 512), np.float32)}, r"CMMD_data\.npz: image has shape \(3, 512\); expected \(N, 2048\)"),
    ({"image": np.full((3, 2048), np.nan, np.float32)}, r"CMMD_data\.npz: image row 0 contains NaN"),
])
def test_loader_rejects_bad_arrays(tmp_path, change, message):
    arrays = {"image": np.zeros((3, 2048), np.float32), "text": np.zeros((3, 768), np.float32),
              "labels": np.array([0, 1, 7])}
    _write_npz(tmp_path, **{**arrays, **change})
    with pytest.raises(DataError, match=message):
        loader.load(tmp_path)


def test_loader_refuses_the_pickled_authors_file(tmp_path):
    (tmp_path / "CMMD_data.pth").write_bytes(b"pickle")
    with pytest.raises(DataError, match=r"CMMD_data\.pth: .*not read.*np\.savez\(path, image=.*text=.*labels="):
        loader.load(tmp_path)
    (tmp_path / "CMMD_data.pth").unlink()
    with pytest.raises(DataError, match=r"CMMD_data\.npz: file not found"):
        loader.load(tmp_path)


def test_loader_checks_the_rows_file_count(tmp_path, release):
    shutil.copy(release["out"] / "CMMD_data.npz", tmp_path / "CMMD_data.npz")
    lines = (release["out"] / "all_data.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "all_data.tsv").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(DataError, match=r"all_data\.tsv: 15 sample rows but CMMD_data\.npz has 16"):
        loader.load(tmp_path)
