"""RAVDESS, VGGSound-50k and CrisisMMD-V2 networks: parameter counts at the real input shapes equal the spec's
(official-mst-spec.md §3.2-3.4), the module names every method taps exist with the spec's shapes, taps are
pre-activation, the fusion order is the authors', and inputs in the prepared layout are permuted inside."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.registry import DISPLAY_NAMES, available_architectures, build_network, count_parameters, module_names
from pipeline.models.taps import FeatureTaps

RAVDESS = {"m1": (15, 3, 224, 224), "m2": (15, 156)}
VGGS = {"m1": (10, 7, 7, 512), "m2": (10, 128)}
CMMD = {"m1": (2048,), "m2": (768,)}
NETS = {  # arch -> (inputs, shapes, classes, spec parameter count)
    "visual_branch_net": (["m1"], RAVDESS, 8, 6_084_420),
    "audio_branch_net": (["m2"], RAVDESS, 8, 575_848),
    "dscnn_i": (["m1", "m2"], RAVDESS, 8, 6_607_300),
    "visual_branch_net_vggs": (["m1"], VGGS, 141, 4_761_549),
    "audio_branch_net_vggs": (["m2"], VGGS, 141, 164_797),
    "dscnn_vggs_i": (["m1", "m2"], VGGS, 141, 4_851_965),
    "mlp_vb": (["m1"], CMMD, 8, 2_627_080),
    "mlp_tb": (["m2"], CMMD, 8, 1_316_360),
    "mlp_i": (["m1", "m2"], CMMD, 8, 4_593_416),
}
SMALL_RAVDESS = {"m1": (15, 3, 32, 32), "m2": (15, 156)}   # the same architecture on 32x32 face crops


def _build(arch: str, shapes=None, device: str | None = None):
    inputs, real, classes, _ = NETS[arch]
    torch.manual_seed(0)
    shapes = shapes or real
    if device == "meta":
        with torch.device("meta"):
            return build_network(arch, inputs, classes, [shapes[k] for k in inputs])
    return build_network(arch, inputs, classes, [shapes[k] for k in inputs])


def _batch(shapes, n: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {key: torch.randn(n, *shape, generator=gen) for key, shape in shapes.items()}


@pytest.mark.parametrize("arch", sorted(NETS))
def test_parameter_counts_at_real_shapes_equal_the_spec(arch):
    assert count_parameters(_build(arch, device="meta")) == NETS[arch][3]
    assert arch in available_architectures() and arch in DISPLAY_NAMES


@pytest.mark.parametrize("arch, shapes", [("visual_branch_net_vggs", VGGS), ("audio_branch_net_vggs", VGGS),
                                          ("dscnn_vggs_i", VGGS), ("mlp_vb", CMMD), ("mlp_tb", CMMD), ("mlp_i", CMMD),
                                          ("audio_branch_net", RAVDESS), ("visual_branch_net", SMALL_RAVDESS),
                                          ("dscnn_i", SMALL_RAVDESS)])
def test_logits_shape(arch, shapes):
    net = _build(arch, shapes).eval()
    with torch.no_grad():
        logits = net(_batch(shapes))
    assert logits.shape == (3, NETS[arch][2]) and torch.isfinite(logits).all()


# the taps of baselines-spec.md §1.8 and the MST hooks of official-mst-spec.md §4.1, with their widths
TAPS = [
    ("dscnn_vggs_i", VGGS, {"audio_branch": 256, "visual_branch": 128, "fc1": 320, "fc2": 160, "fc3": 141}),
    ("visual_branch_net_vggs", VGGS, {"visual_branch": 128, "fc1": 320, "fc2": 160, "fc3": 141}),
    ("audio_branch_net_vggs", VGGS, {"audio_branch": 256, "fc1": 320, "fc2": 160, "fc3": 141}),
    ("audio_branch_net", RAVDESS, {"audio_branch": 1280, "fc1": 320, "fc2": 160, "fc3": 8}),
    ("mlp_i", CMMD, {"fc1": 512, "fc2": 256, "fc3": 8}),
    ("mlp_vb", CMMD, {"fc1": 1024, "fc2": 512, "fc3": 8}),
    ("mlp_tb", CMMD, {"fc1": 1024, "fc2": 512, "fc3": 8}),
]


@pytest.mark.parametrize("arch, shapes, widths", TAPS)
def test_tap_widths_and_pre_activation(arch, shapes, widths):
    net = _build(arch, shapes).eval()
    with torch.no_grad(), FeatureTaps(net.body, list(widths)) as taps:
        net(_batch(shapes, n=4))
    assert {name: taps[name].shape[1:] for name in widths} == {name: (w,) for name, w in widths.items()}
    assert (taps["fc1"] < 0).any() and (taps["fc2"] < 0).any()   # ReLU is applied after the hook


def test_ravdess_visual_branch_flattens_18816_at_224():
    """The video trunk alone at the real shape (cheap enough: one clip): 24 x 1 x 28 x 28."""
    net = _build("visual_branch_net").eval()
    with torch.no_grad(), FeatureTaps(net.body, ["visual_branch"]) as taps:
        net({"m1": torch.rand(1, *RAVDESS["m1"])})
    assert taps["visual_branch"].shape == (1, 18_816)
    assert set(module_names("dscnn_i")) >= {"visual_branch", "audio_branch", "fc1", "fc2", "fc3"}


@pytest.mark.parametrize("arch, shapes, first", [("dscnn_vggs_i", VGGS, "audio_branch"),
                                                 ("dscnn_i", SMALL_RAVDESS, "audio_branch"),
                                                 ("mlp_i", CMMD, "visual_net")])
def test_fusion_concatenation_order_is_the_authors(arch, shapes, first):
    """DSCNN nets concatenate audio first, MLP-I visual first: fc1's input begins with that trunk's output."""
    net = _build(arch, shapes).eval()
    body = net.body
    seen = {}
    body.fc1.register_forward_hook(lambda m, inputs, out: seen.update(input=inputs[0]))
    with torch.no_grad(), FeatureTaps(body, [first]) as taps:
        net(_batch(shapes))
    width = taps[first].shape[1]
    assert torch.equal(seen["input"][:, :width], taps[first])


def test_inputs_in_the_prepared_layout_are_permuted_inside():
    """VGGS visual features arrive (B,10,7,7,512) and the trunk sees (B,512,10,7,7); RAVDESS video arrives
    (B,15,3,H,W) and the trunk sees (B,3,15,H,W)."""
    seen = {}
    for arch, shapes in (("visual_branch_net_vggs", VGGS), ("visual_branch_net", SMALL_RAVDESS)):
        net = _build(arch, shapes).eval()
        net.body.visual_branch.conv1.register_forward_pre_hook(lambda m, inputs, a=arch: seen.update({a: inputs[0]}))
        batch = _batch(shapes, n=2)
        with torch.no_grad():
            net(batch)
        expected = batch["m1"].permute(0, 4, 1, 2, 3) if arch.endswith("vggs") else batch["m1"].permute(0, 2, 1, 3, 4)
        assert torch.equal(seen[arch], expected)
