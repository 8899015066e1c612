"""params.yaml parsing: strict keys, types and values, every error naming the key path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipeline.data.av_digits import AVDigitsRecipe
from pipeline.data.splits import SplitParams
from pipeline.methods.kd import KDParams
from pipeline.orchestration.config import Params, load_params, parse_params
from pipeline.params import ParamsError, UnlistedParamError, flatten, read_yaml, restrict_to
from pipeline.tracking.base import TrackingParams
from pipeline.training.settings import EngineParams, TrainingParams
from tests import conftest

PARAMS_YAML = Path(__file__).parents[1] / "params.yaml"


@pytest.fixture
def raw_params() -> dict:
    return conftest.raw_params()


def _edited(raw: dict, edit) -> dict:
    broken = copy.deepcopy(raw)
    edit(broken)
    return broken


def test_repository_params_yaml_parses():
    """The shipped params.yaml is valid and yields typed dataclasses."""
    params = load_params(PARAMS_YAML, restrict=False)
    assert isinstance(params, Params)
    assert isinstance(params.av_digits, AVDigitsRecipe)
    assert isinstance(params.splits, SplitParams)
    assert isinstance(params.engine, EngineParams)
    assert isinstance(params.method("kd"), KDParams)
    assert isinstance(params.tracking, TrackingParams)
    assert all(isinstance(t, TrainingParams) for t in params.training.values())
    assert params.seeds and len(set(params.seeds)) == len(params.seeds)
    assert set(params.datasets) <= set(params.training)
    assert params.splits.train_fraction + params.splits.val_fraction < 1


def test_parse_params_matches_load_params(raw_params):
    """parse_params on the loaded YAML gives the same result as load_params on the file."""
    assert parse_params(raw_params) == load_params(PARAMS_YAML, restrict=False)


def test_float_fields_accept_integers_and_return_floats(raw_params):
    """An integer YAML value for a float key is accepted and converted to float."""
    params = parse_params(_edited(raw_params, lambda r: r["kd"].__setitem__("temperature", 4)))
    assert params.method("kd").temperature == 4.0
    assert isinstance(params.method("kd").temperature, float)


@pytest.mark.parametrize(
    "edit, key, suggestion",
    [
        (lambda r: r.__setitem__("seed", [0]), "seed", "seeds"),
        (lambda r: r.__setitem__("devcie", "cpu"), "devcie", "device"),
        (lambda r: r["kd"].__setitem__("temprature", r["kd"].pop("temperature")), "kd.temprature", "temperature"),
        (lambda r: r["splits"].__setitem__("train_fractoin", r["splits"].pop("train_fraction")),
         "splits.train_fractoin", "train_fraction"),
        (lambda r: r["training"]["av_digits"].__setitem__("epoch", r["training"]["av_digits"].pop("epochs")),
         "training.av_digits.epoch", "epochs"),
    ],
    ids=["top-level-seed", "top-level-devcie", "kd.temprature", "splits.train_fractoin", "training.epoch"],
)
def test_unknown_or_misspelled_key_names_path_and_suggests_spelling(raw_params, edit, key, suggestion):
    """A misspelled key raises ParamsError naming its full path and the close spelling."""
    with pytest.raises(ParamsError) as info:
        parse_params(_edited(raw_params, edit))
    message = str(info.value)
    assert key in message
    assert f"did you mean {suggestion!r}" in message


def test_unknown_key_without_close_match_lists_allowed_keys(raw_params):
    """An unknown key with no close spelling lists the allowed keys instead."""
    with pytest.raises(ParamsError) as info:
        parse_params(_edited(raw_params, lambda r: r["kd"].__setitem__("zzzzzz", 1)))
    message = str(info.value)
    assert "kd.zzzzzz" in message
    assert "allowed keys" in message and "temperature" in message


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(raw):
        node = raw
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return edit


def _delete(*path):
    def edit(raw):
        node = raw
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
    return edit


def _add_dataset_without_training(raw):
    raw["datasets"]["av_mnist"] = "data/raw/av_mnist"
    del raw["training"]["av_mnist"]


BROKEN = [
    # missing keys
    ("missing kd.alpha", _delete("kd", "alpha"), "kd.alpha"),
    ("missing kd.alpha.initial", _delete("kd", "alpha", "initial"), "kd.alpha.initial"),
    ("missing top-level tracking", _delete("tracking"), "tracking"),
    ("missing av_digits.seed", _delete("av_digits", "seed"), "av_digits.seed"),
    # wrong types
    ("lr as string", _set("training", "av_digits", "lr", "0.001"), "training.av_digits.lr"),
    ("lr as yaml-1.1 string 1e-3", _set("training", "av_digits", "lr", "1e-3"), "training.av_digits.lr"),
    ("bool for int epochs", _set("training", "av_digits", "epochs", True), "training.av_digits.epochs"),
    ("bool for int batch_size", _set("training", "av_digits", "batch_size", False), "training.av_digits.batch_size"),
    ("float for seeds[0]", _set("seeds", 0, 0.0), "seeds[0]"),
    ("string for seeds[1]", _set("seeds", 1, "1"), "seeds[1]"),
    ("seeds not a list", _set("seeds", 0), "seeds"),
    ("int for bool deterministic", _set("deterministic", 1), "deterministic"),
    ("string for bool tracking.mlflow", _set("tracking", "mlflow", "yes"), "tracking.mlflow"),
    ("kd not a mapping", _set("kd", 4.0), "kd"),
    ("empty dataset folder", _set("datasets", "av_digits", ""), "datasets.av_digits"),
    # impossible values
    ("negative lr", _set("training", "av_digits", "lr", -0.001), "training.av_digits.lr"),
    ("zero epochs", _set("training", "av_digits", "epochs", 0), "training.av_digits.epochs"),
    ("pca_variance_kept 1.5", _set("av_digits", "pca_variance_kept", 1.5), "av_digits.pca_variance_kept"),
    ("samples_per_class 501", _set("av_digits", "samples_per_class", 501), "av_digits.samples_per_class"),
    ("spectrogram_size 8", _set("av_digits", "spectrogram_size", 8), "av_digits.spectrogram_size"),
    ("kd.alpha.initial 1.5", _set("kd", "alpha", "initial", 1.5), "kd.alpha.initial"),
    ("kd.alpha not a mapping", _set("kd", "alpha", 0.5), "kd.alpha"),
    ("train+val == 1", lambda r: r["splits"].update(train_fraction=0.8, val_fraction=0.2), "splits.val_fraction"),
    ("train+val > 1", lambda r: r["splits"].update(train_fraction=0.7, val_fraction=0.5), "splits.val_fraction"),
    ("snr_db_min > snr_db_max", lambda r: r["av_digits"].update(snr_db_min=7.0, snr_db_max=6.0),
     "av_digits.snr_db_min"),
    ("lr as yaml-1.1 string 1e-4", _set("training", "av_digits", "lr", "1e-4"), "training.av_digits.lr"),
    ("empty seeds", _set("seeds", []), "seeds"),
    ("duplicate seeds", _set("seeds", [0, 1, 1]), "seeds"),
    ("seed == permutations", _set("seeds", [0, 1, 20]), "seeds[2]"),
    ("negative seed", _set("seeds", [-1]), "seeds[0]"),
    ("unknown dataset", _set("datasets", "av_mnsit", "data/raw/av_mnist"), "datasets.av_mnsit"),
    ("enabled dataset without training block", _add_dataset_without_training, "training.av_mnist"),
    ("training block for unknown dataset", _set("training", "mnist", {"epochs": 1, "batch_size": 1, "lr": 0.1}),
     "training.mnist"),
    ("no enabled datasets", _set("datasets", {}), "datasets"),
    ("invalid engine.selection", _set("engine", "selection", "val_acc"), "engine.selection"),
    ("invalid kd.alpha.schedule", _set("kd", "alpha", "schedule", "cosine"), "kd.alpha.schedule"),
    ("unknown method in methods", _set("methods", ["kd", "kdd"]), "methods[1]"),
    ("mst in methods", _set("methods", ["mst"]), "methods[0]"),
    ("unknown tap module", _set("fitnets", "taps", "cnn_i", "lenet5", 0, "student", "conv9"),
     "fitnets.taps.cnn_i.lenet5"),
    ("unknown tap architecture", lambda r: r["ofa"]["taps"].__setitem__("resnet", {"lenet5": ["conv1"]}),
     "ofa.taps.resnet"),
    ("unknown MST hook", _set("mst", "hooks", "lenet5", ["conv3", "fc9"]), "mst.hooks.lenet5"),
    ("too few MST hooks", _set("mst", "hooks", "lenet5", ["conv3"]), "mst.hooks.lenet5"),
    ("topk above N", _set("topk", 5), "topk"),
    ("invalid device gpu", _set("device", "gpu"), "device"),
    ("invalid device tpu:0", _set("device", "tpu:0"), "device"),
    ("invalid device cuda:abc", _set("device", "cuda:abc"), "device"),
    ("invalid device cuda:", _set("device", "cuda:"), "device"),
]


@pytest.mark.parametrize("edit, key", [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_invalid_params_raise_error_naming_key(raw_params, edit, key):
    """Each one-key breakage raises ParamsError whose message names the offending key path."""
    with pytest.raises(ParamsError) as info:
        parse_params(_edited(raw_params, edit), source="my-params.yaml")
    message = str(info.value)
    assert message.startswith("my-params.yaml: ")
    assert f" {key}: " in message


def test_unknown_dataset_suggests_close_spelling(raw_params):
    """A misspelled dataset name under `datasets` suggests the known one."""
    with pytest.raises(ParamsError, match=r"did you mean 'av_mnist'"):
        parse_params(_edited(raw_params, _set("datasets", "av_mnsit", "data/raw/av_mnist")))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_valid_device_strings_are_accepted(raw_params, device):
    """The documented device choices parse."""
    assert parse_params(_edited(raw_params, _set("device", device))).device == device


def test_params_error_is_a_value_error():
    """ParamsError subclasses ValueError so generic handlers still catch it."""
    assert issubclass(ParamsError, ValueError)


@pytest.mark.parametrize("text", ["seeds: [0, 1\ndevice: cpu\n", "\tseeds:\n- 0\n", "a: b: c\n"],
                         ids=["unclosed-list", "tab-indent", "nested-colon"])
def test_non_yaml_text_names_file(tmp_path, text):
    """A file that is not valid YAML raises ParamsError naming the file."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


@pytest.mark.parametrize("text", ["", "just some text\n", "- 1\n- 2\n"], ids=["empty", "scalar", "list"])
def test_yaml_that_is_not_a_mapping_names_file(tmp_path, text):
    """Valid YAML that is not a mapping of parameters raises ParamsError naming the file."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "expected a mapping" in str(info.value)


def test_missing_file_names_file(tmp_path):
    """A missing params file raises ParamsError naming the path."""
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_every_registered_method_with_params_has_a_block(raw_params):
    """The registry and params.yaml agree: each method's block parses into its own params type, and the
    distill matrix (`methods`) lists every baseline."""
    from pipeline.methods import all_methods
    params = parse_params(raw_params)
    for cls in all_methods():
        if cls.params_type is not None:
            assert isinstance(params.blocks[cls.name], cls.params_type), cls.name
            assert set(getattr(params.blocks[cls.name], "teachers", [])) <= set(cls.teacher_configs), cls.name
    assert sorted(params.methods) == sorted(c.name for c in all_methods() if c.name not in ("ce", "mst"))


def test_yaml_exponent_without_dot_names_the_key_and_the_fix(raw_params):
    """YAML 1.1 reads 1e-4 as a string: the error says so and gives the spelling that works."""
    with pytest.raises(ParamsError) as info:
        parse_params(_edited(raw_params, _set("training", "av_digits", "lr", "1e-4")))
    assert "training.av_digits.lr" in str(info.value) and "write 1.0e-4" in str(info.value)


def test_empty_params_file_is_one_clear_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ParamsError, match="the parameters file is empty") as info:
        read_yaml(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_restricted_view_reads_listed_keys_and_names_unlisted_ones(raw_params):
    """What a DVC stage gets: only the keys its dvc.yaml entry lists (and the output-neutral ones)."""
    params = parse_params(raw_params)
    view = restrict_to(params, ["seeds", "training.av_digits", "mst.temperature", "kd"], "distill@av_digits-kd")
    assert view.seeds == params.seeds and view.training["av_digits"] == params.training["av_digits"]
    assert view.method("kd") == params.method("kd") and view.workers == params.workers  # workers: output-neutral
    assert view.blocks["mst"].temperature == params.blocks["mst"].temperature
    with pytest.raises(UnlistedParamError, match=r"params\.yaml: device: stage 'distill@av_digits-kd' reads"):
        _ = view.device.upper()
    with pytest.raises(UnlistedParamError, match=r"teacher_training"):
        _ = view.teacher_training["av_digits"]
    with pytest.raises(UnlistedParamError, match=r"training\.av_mnist"):
        _ = view.training["av_mnist"]
    with pytest.raises(UnlistedParamError, match=r"mst\.heads"):
        _ = view.blocks["mst"].heads + 1
    with pytest.raises(UnlistedParamError, match=r"mlld"):
        view.method("mlld")
    # what is logged for a run is what the stage depends on
    assert set(flatten(view.blocks["mst"])) == {"temperature"}


def test_missing_method_block_is_named(raw_params):
    with pytest.raises(ParamsError, match=r"kd: missing required key \(the params of method 'kd'\)"):
        parse_params(_edited(raw_params, lambda r: r.pop("kd")))


def test_unsupported_teacher_config_is_a_clear_error(raw_params):
    with pytest.raises(ParamsError, match=r"kd\.teachers\[1\]: method 'kd' does not support teacher config "
                                          r"'mm\+cm'; it supports: mm, cm"):
        parse_params(_edited(raw_params, lambda r: r["kd"].__setitem__("teachers", ["mm", "mm+cm"])))


@pytest.mark.parametrize("changes, key, expected", [
    ({"min_epochs": 60}, "training.av_digits.min_epochs", r"must not exceed epochs \(50\)"),
    ({"patience": -1}, "training.av_digits.patience", ">= 0"),
])
def test_early_stopping_keys_are_checked_before_any_work(raw_params, changes, key, expected):
    raw = raw_params
    raw["training"]["av_digits"].update(changes)
    with pytest.raises(ParamsError, match=rf"{key}.*{expected}"):
        parse_params(raw)
