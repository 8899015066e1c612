"""Checkpoints: exact round trip, weights-only loading, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.registry import Network, build_network
from pipeline.training.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

CPU = torch.device("cpu")
LENET_SHAPES = [(1, 28, 28)]


class NotWeights:
    """An arbitrary Python object: loading it would need full unpickling."""

    def __init__(self) -> None:
        self.payload = {"arch": "lenet5"}


def _lenet(seed: int = 0) -> Network:
    torch.manual_seed(seed)
    return build_network("lenet5", ["m1"], 10, LENET_SHAPES)


@pytest.fixture
def saved(tmp_path):
    net = _lenet()
    path = tmp_path / "models" / "lenet5.pt"
    save_checkpoint(path, net, net.state_dict(), LENET_SHAPES, 10)
    return path, net


def _assert_names_path(info, path) -> None:
    assert str(path) in str(info.value), str(info.value)


def test_round_trip_weights_exactly(saved):
    """load_checkpoint rebuilds a LeNet5 whose state_dict equals the saved one bit for bit."""
    path, net = saved
    loaded = load_checkpoint(path, CPU, expect_arch="lenet5", expect_inputs=("m1",))
    assert isinstance(loaded, Network)
    assert loaded.arch == "lenet5" and loaded.inputs == ("m1",)
    original, restored = net.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert restored[key].dtype == original[key].dtype
        assert torch.equal(restored[key], original[key]), key


def test_round_trip_differs_from_fresh_init(saved):
    """The loaded weights are the saved ones, not a fresh initialisation."""
    path, net = saved
    loaded = load_checkpoint(path, CPU)
    fresh = _lenet(seed=1)
    assert not torch.equal(fresh.state_dict()["body.conv1.weight"], loaded.state_dict()["body.conv1.weight"])
    batch = {"m1": torch.rand(3, 1, 28, 28)}
    with torch.no_grad():
        assert torch.equal(loaded(batch), net(batch))


def test_saved_file_is_weights_only_readable(saved):
    """The file loads with torch.load(weights_only=True) and holds the documented keys."""
    path, net = saved
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert set(payload) == {"arch", "inputs", "num_classes", "input_shapes", "structure", "state_dict"}
    assert payload["arch"] == "lenet5"
    assert payload["inputs"] == ["m1"]
    assert payload["num_classes"] == 10
    assert payload["input_shapes"] == [[1, 28, 28]]
    assert payload["state_dict"].keys() == net.state_dict().keys()


def test_save_leaves_no_temporary_file(saved):
    """The atomic write leaves only the checkpoint in its folder."""
    path, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_save_overwrites_existing_checkpoint(saved):
    """Saving again replaces the previous weights."""
    path, _ = saved
    other = _lenet(seed=5)
    save_checkpoint(path, other, other.state_dict(), LENET_SHAPES, 10)
    loaded = load_checkpoint(path, CPU)
    assert torch.equal(loaded.state_dict()["body.fc2.bias"], other.state_dict()["body.fc2.bias"])


def test_round_trip_multimodal_network(tmp_path):
    """A two-input CNN-I at a small spectrogram size round-trips with its inputs and shapes."""
    torch.manual_seed(0)
    shapes = [(1, 28, 28), (1, 16, 16)]
    net = build_network("cnn_i", ["m1", "m2"], 10, shapes)
    path = tmp_path / "cnn_i.pt"
    save_checkpoint(path, net, net.state_dict(), shapes, 10)
    loaded = load_checkpoint(path, CPU, expect_arch="cnn_i", expect_inputs=("m1", "m2"))
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_truncated_checkpoint(saved):
    """A checkpoint cut short raises CheckpointError naming the path."""
    path, _ = saved
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU)
    _assert_names_path(info, path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path, seed):
    """A file of random bytes raises CheckpointError naming the path."""
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.RandomState(seed).bytes(2048))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU)
    _assert_names_path(info, path)


def test_missing_checkpoint(tmp_path):
    """A missing checkpoint raises CheckpointError naming the path."""
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU)
    _assert_names_path(info, path)
    assert "not found" in str(info.value)


def test_directory_instead_of_file(tmp_path):
    """A directory at the checkpoint path is reported as not found."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, CPU)
    _assert_names_path(info, tmp_path)


def test_wrong_architecture(saved):
    """A LeNet5 checkpoint loaded as ThreeLayerCNN-A raises CheckpointError naming both."""
    path, _ = saved
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU, expect_arch="three_layer_cnn_a")
    _assert_names_path(info, path)
    assert "lenet5" in str(info.value) and "three_layer_cnn_a" in str(info.value)


def test_wrong_inputs(saved):
    """A checkpoint reading m1 loaded where m2 is expected raises CheckpointError."""
    path, _ = saved
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU, expect_inputs=("m2",))
    _assert_names_path(info, path)


def _save_payload(path, **changes) -> None:
    net = _lenet()
    payload = {"arch": "lenet5", "inputs": ["m1"], "num_classes": 10, "input_shapes": [[1, 28, 28]],
               "state_dict": dict(net.state_dict())}
    payload.update(changes)
    torch.save(payload, path)


def test_tensor_of_wrong_shape(tmp_path):
    """A state_dict tensor of the wrong shape raises CheckpointError naming the path."""
    path = tmp_path / "bad_shape.pt"
    state = dict(_lenet().state_dict())
    state["body.fc2.weight"] = torch.zeros(5, 84)
    _save_payload(path, state_dict=state)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU, expect_arch="lenet5")
    _assert_names_path(info, path)
    assert "body.fc2.weight" in str(info.value)


@pytest.mark.parametrize("edit", ["missing_key", "extra_key"])
def test_state_dict_key_mismatch(tmp_path, edit):
    """A state_dict with a missing or unexpected key raises CheckpointError naming the path."""
    path = tmp_path / "bad_keys.pt"
    state = dict(_lenet().state_dict())
    if edit == "missing_key":
        del state["body.conv1.bias"]
    else:
        state["body.conv9.weight"] = torch.zeros(1)
    _save_payload(path, state_dict=state)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU)
    _assert_names_path(info, path)


def test_payload_not_a_checkpoint_dict(tmp_path):
    """A weights-only-loadable object that is not a checkpoint dict is refused, naming the path."""
    path = tmp_path / "just_weights.pt"
    torch.save(_lenet().state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU)
    _assert_names_path(info, path)
    assert "state_dict" in str(info.value)


def test_arbitrary_python_object_is_refused(tmp_path):
    """A pickled non-weights object is refused: loading is weights-only."""
    path = tmp_path / "object.pt"
    torch.save(NotWeights(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU)
    _assert_names_path(info, path)


def test_checkpoint_dict_holding_an_object_is_refused(tmp_path):
    """A checkpoint dict smuggling an arbitrary object inside is refused too."""
    path = tmp_path / "smuggled.pt"
    _save_payload(path, num_classes=NotWeights())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, CPU)
    _assert_names_path(info, path)


def test_checkpoint_error_is_a_value_error():
    """CheckpointError subclasses ValueError."""
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("payload", [b"h\x05", b"a"])
def test_corrupt_bytes_that_break_the_unpickler_oddly_are_checkpoint_errors(tmp_path, payload):
    """Some corrupt files raise KeyError/IndexError inside torch.load; they must still name the file."""
    path = tmp_path / "odd.pt"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="odd.pt"):
        load_checkpoint(path, torch.device("cpu"))


@pytest.mark.parametrize("bad", [{"arch": "resnet"}, {"arch": "lenet5", "inputs": ["m1", "m2"]},
                                 {"arch": "three_layer_cnn_a", "inputs": ["m2"], "input_shapes": [[1, 4, 4]]}])
def test_unbuildable_network_description_is_a_checkpoint_error(tmp_path, bad):
    path = tmp_path / "unbuildable.pt"
    torch.save({"inputs": ["m1"], "num_classes": 10, "input_shapes": [[1, 28, 28]], "state_dict": {}, **bad}, path)
    with pytest.raises(CheckpointError, match="unbuildable.pt"):
        load_checkpoint(path, torch.device("cpu"))
