"""AV-MNIST architectures: parameter counts, shapes, module names, feature taps, the 1×1 conv path."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

from pipeline.models.av_mnist_nets import CNNI, LeNet5, ThreeLayerCNNA, _conv3x3_same
from pipeline.models.registry import Network, available_architectures, build_network, count_parameters
from pipeline.models.taps import FeatureTaps

BATCH = 2
INPUTS = {"lenet5": ["m1"], "three_layer_cnn_a": ["m2"], "cnn_i": ["m1", "m2"]}


def _shapes(arch: str, size: int) -> list[tuple[int, ...]]:
    per_key = {"m1": (1, 28, 28), "m2": (1, size, size)}
    return [per_key[key] for key in INPUTS[arch]]


@lru_cache(maxsize=None)
def _build(arch: str, size: int = 112) -> Network:
    """A seeded network, built once per (arch, size); tests only run it forward, never train it."""
    torch.manual_seed(0)
    return build_network(arch, INPUTS[arch], 10, _shapes(arch, size))


def _batch(size: int, batch: int = BATCH) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"m1": torch.rand(batch, 1, 28, 28, generator=gen), "m2": torch.rand(batch, 1, size, size, generator=gen)}


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks for m in module.modules())


def test_available_architectures():
    """The registry knows the three AV-MNIST networks (the other datasets' in test_dataset_models.py)."""
    assert {"cnn_i", "lenet5", "three_layer_cnn_a"} <= set(available_architectures())


@pytest.mark.parametrize("arch, expected", [("lenet5", 61_706), ("three_layer_cnn_a", 343_562),
                                            ("cnn_i", 1_809_752)])
def test_parameter_counts_match_spec(arch, expected):
    """Parameter counts at AV-MNIST input sizes equal the spec exactly."""
    assert count_parameters(_build(arch, 112)) == expected


def test_parameter_count_example_from_brief():
    """build_network('three_layer_cnn_a', ['m2'], 10, [(1,112,112)]) has 343,562 parameters."""
    assert count_parameters(build_network("three_layer_cnn_a", ["m2"], 10, [(1, 112, 112)])) == 343_562


@pytest.mark.parametrize("size", [16, 32, 112])
@pytest.mark.parametrize("arch", ["lenet5", "three_layer_cnn_a", "cnn_i"])
def test_output_shape(arch, size):
    """Every network maps the batch dict to (B, 10) finite logits."""
    net = _build(arch, size)
    with torch.no_grad():
        logits = net(_batch(size))
    assert logits.shape == (BATCH, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [8, 12, 16, 20, 32, 112])
def test_three_layer_cnn_a_fc1_input_size(size):
    """ThreeLayerCNN-A's fc1 reads 128·(S//8)² features."""
    net = _build("three_layer_cnn_a", size)
    assert net.body.fc1.in_features == 128 * (size // 8) ** 2
    with torch.no_grad():
        assert net(_batch(size)).shape == (BATCH, 10)


def test_num_classes_is_honoured():
    """num_classes sets the width of the final layer."""
    net = build_network("cnn_i", ["m1", "m2"], 7, [(1, 28, 28), (1, 16, 16)])
    with torch.no_grad():
        assert net(_batch(16)).shape == (BATCH, 7)


@pytest.mark.parametrize("ctor, size", [(lambda: ThreeLayerCNNA(10, 7), 7), (lambda: CNNI(10, 15), 15)])
def test_too_small_spectrograms_are_rejected(ctor, size):
    """Audio nets refuse spectrograms smaller than their pooling allows."""
    with pytest.raises(ValueError, match=str(size)):
        ctor()


def test_unknown_architecture_and_shape_mismatch():
    """build_network rejects unknown names and mismatched input/shape lists."""
    with pytest.raises(KeyError, match="resnet"):
        build_network("resnet", ["m1"], 10, [(1, 28, 28)])
    with pytest.raises(ValueError, match="2 inputs but 1 input shapes"):
        build_network("cnn_i", ["m1", "m2"], 10, [(1, 28, 28)])


@pytest.mark.parametrize("arch, names", [
    ("lenet5", ["conv1", "conv2", "conv3", "flatten_identity", "fc1", "fc2"]),
    ("three_layer_cnn_a", ["conv1", "conv2", "conv3", "conv3_maxpool", "conv3_maxpool_flatten", "fc1"]),
    ("cnn_i", ["image_net", "audio_net", "concat_identity", "fc1", "fc2"]),
])
def test_spec_module_names_exist(arch, names):
    """The module names the methods tap by are present on the network body."""
    modules = dict(_build(arch).body.named_modules())
    for name in names:
        assert name in modules, name


def test_body_classes():
    """The registry builds the expected classes."""
    assert isinstance(_build("lenet5").body, LeNet5)
    assert isinstance(_build("three_layer_cnn_a").body, ThreeLayerCNNA)
    assert isinstance(_build("cnn_i").body, CNNI)


@pytest.mark.parametrize("size", [16, 112])
def test_cnn_i_concat_is_image_first(size):
    """concat_identity is 596 wide, [image 84 | audio 512]; fc1 is 298 wide."""
    net = _build("cnn_i", size).body
    batch = _batch(size)
    with torch.no_grad(), FeatureTaps(net, ["image_net", "audio_net", "concat_identity", "fc1", "fc2"]) as taps:
        logits = net(batch["m1"], batch["m2"])
    fused = taps["concat_identity"]
    assert fused.shape == (BATCH, 596)
    assert torch.equal(fused[:, :84], taps["image_net"])
    assert torch.equal(fused[:, 84:], taps["audio_net"])
    assert taps["fc1"].shape == (BATCH, 298)
    assert torch.equal(taps["fc2"], logits)
    # fc1 has no activation after it (quirk Q18): fc2 reads it unchanged.
    assert torch.allclose(net.fc2(taps["fc1"]), logits)


def test_cnn_i_image_trunk_matches_standalone_lenet_trunk():
    """The first 84 fused entries equal LeNet's 84-d trunk output computed directly."""
    net = _build("cnn_i", 16).body
    batch = _batch(16)
    with torch.no_grad(), FeatureTaps(net, ["concat_identity"]) as taps:
        net(batch["m1"], batch["m2"])
        direct = net.image_net(batch["m1"])
    assert direct.shape == (BATCH, 84)
    assert torch.equal(taps["concat_identity"][:, :84], direct)


@pytest.mark.parametrize("arch, size, name, shape", [
    ("three_layer_cnn_a", 112, "conv1", (BATCH, 32, 112, 112)),
    ("three_layer_cnn_a", 112, "conv2", (BATCH, 64, 56, 56)),
    ("three_layer_cnn_a", 112, "conv3", (BATCH, 128, 28, 28)),
    ("three_layer_cnn_a", 112, "conv3_maxpool", (BATCH, 128, 14, 14)),
    ("three_layer_cnn_a", 112, "conv3_maxpool_flatten", (BATCH, 128 * 14 * 14)),
    ("three_layer_cnn_a", 16, "conv3_maxpool_flatten", (BATCH, 128 * 2 * 2)),
    ("lenet5", 112, "conv1", (BATCH, 6, 28, 28)),
    ("lenet5", 112, "conv2", (BATCH, 16, 10, 10)),
    ("lenet5", 112, "conv3", (BATCH, 120, 1, 1)),
    ("lenet5", 112, "flatten_identity", (BATCH, 120)),
    ("lenet5", 112, "fc1", (BATCH, 84)),
])
def test_feature_tap_shapes(arch, size, name, shape):
    """FeatureTaps records each named module's output with the expected shape."""
    net = _build(arch, size).body
    batch = _batch(size)
    inputs = [batch[key] for key in INPUTS[arch]]
    with torch.no_grad(), FeatureTaps(net, [name]) as taps:
        net(*inputs)
    assert taps[name].shape == shape


@pytest.mark.parametrize("arch, name", [("three_layer_cnn_a", "conv2"), ("lenet5", "conv3"), ("lenet5", "fc1")])
def test_feature_taps_are_pre_activation(arch, name):
    """Taps on conv/linear modules see pre-ReLU outputs (negative values present)."""
    net = _build(arch, 32).body
    batch = _batch(32, batch=4)
    with torch.no_grad(), FeatureTaps(net, [name]) as taps:
        net(*[batch[key] for key in INPUTS[arch]])
    assert (taps[name] < 0).any()


def test_feature_taps_work_through_network_wrapper():
    """Taps address nested modules by dotted name on the Network wrapper."""
    net = _build("lenet5")
    with torch.no_grad(), FeatureTaps(net, ["body.fc1", "body.fc2"]) as taps:
        logits = net(_batch(16))
    assert taps["body.fc1"].shape == (BATCH, 84)
    assert torch.equal(taps["body.fc2"], logits)


def test_feature_taps_remove_hooks_on_exit():
    """No forward hooks remain after the context exits; outputs stay readable."""
    net = _build("three_layer_cnn_a", 16).body
    names = ["conv1", "conv2", "conv3", "conv3_maxpool", "conv3_maxpool_flatten", "fc1"]
    taps = FeatureTaps(net, names)
    assert _no_hooks(net)
    with taps:
        assert sum(len(m._forward_hooks) for m in net.modules()) == len(names)
        with torch.no_grad():
            net(_batch(16)["m2"])
    assert _no_hooks(net)
    assert set(taps.outputs) == set(names)


def test_feature_taps_remove_hooks_after_exception():
    """Hooks are removed even when the body of the with-block raises."""
    net = _build("lenet5").body
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(net, ["conv1", "fc2"]):
            raise RuntimeError("boom")
    assert _no_hooks(net)


def test_feature_taps_record_nothing_after_exit():
    """A forward pass after exit does not update the recorded outputs."""
    net = _build("lenet5").body
    batch = _batch(16)
    with torch.no_grad():
        with FeatureTaps(net, ["fc2"]) as taps:
            first = net(batch["m1"])
        net(batch["m1"] * 0.5)
    assert torch.equal(taps["fc2"], first)


def test_feature_taps_unknown_name_raises_key_error():
    """An unknown module name raises KeyError naming it (and registers no hooks)."""
    net = _build("lenet5").body
    with pytest.raises(KeyError) as info:
        FeatureTaps(net, ["conv1", "conv9"])
    assert "conv9" in str(info.value)
    assert "conv1" in str(info.value)  # the list of known modules
    assert _no_hooks(net)


def _conv_pair(in_ch: int, out_ch: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(3)
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    twin = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    twin.load_state_dict(conv.state_dict())
    return conv, twin


@pytest.mark.parametrize("batch, in_ch, out_ch", [(1, 1, 1), (3, 8, 5), (4, 256, 512)])
def test_conv3x3_same_on_1x1_matches_conv_output_and_gradients(batch, in_ch, out_ch):
    """On a (B,C,1,1) map the linear shortcut equals the padded 3×3 conv, output and gradients."""
    conv, twin = _conv_pair(in_ch, out_ch)
    x = torch.randn(batch, in_ch, 1, 1, generator=torch.Generator().manual_seed(4))
    x_ref = x.clone().requires_grad_(True)
    x_new = x.clone().requires_grad_(True)
    upstream = torch.randn(batch, out_ch, 1, 1, generator=torch.Generator().manual_seed(5))

    ref = conv(x_ref)
    new = _conv3x3_same(twin, x_new)
    assert new.shape == ref.shape == (batch, out_ch, 1, 1)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)

    (ref * upstream).sum().backward()
    (new * upstream).sum().backward()
    torch.testing.assert_close(twin.weight.grad, conv.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(twin.bias.grad, conv.bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_new.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    # only the centre tap meets data; the others get zero gradient on both paths
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    assert torch.all(twin.weight.grad[:, :, off_centre] == 0)


class _CountingConv(nn.Conv2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("side", [2, 3, 7])
def test_conv3x3_same_calls_conv_on_larger_maps(side):
    """On maps larger than 1×1 it simply calls the conv module."""
    torch.manual_seed(6)
    conv = _CountingConv(4, 6, 3, padding=1)
    x = torch.randn(2, 4, side, side)
    out = _conv3x3_same(conv, x)
    assert conv.calls == 1
    assert torch.equal(out, nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


def test_conv3x3_same_skips_conv_call_on_1x1():
    """On a 1×1 map the conv module itself is not called."""
    conv = _CountingConv(4, 6, 3, padding=1)
    _conv3x3_same(conv, torch.randn(2, 4, 1, 1))
    assert conv.calls == 0
