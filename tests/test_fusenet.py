"""FuseNet (official-mst-spec.md §3.5): parameter counts, hook names and shapes, the intermediate fusion, the
unpool indices, dropout placement, the authors' initialisation, the VGG16 copy and its errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.validation import DataError
from pipeline.models.fusenet import (FuseNetBranch, FuseNetI, build_fusenet_branch, build_fusenet_i, init_fusenet,
                                     vgg16_conv_mapping)
from pipeline.params import ParamsError

C = 41
B, H, W = 2, 32, 64
WIDTH = 1 / 16  # 64 -> 4, 128 -> 8, 256 -> 16, 512 -> 32 channels


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tiny(kind: str, seed: int = 0, h: int = H, w: int = W) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "i":
        return build_fusenet_i(C, [(3, h, w), (1, h, w)], width=WIDTH)
    return build_fusenet_branch(C, [(3 if kind == "rgb" else 1, h, w)], kind, width=WIDTH)


def _tiny_train(kind: str, seed: int = 0) -> nn.Module:
    """Width 1/16, dropout 0, train mode: BN normalises with batch statistics, so maps are O(1). (In eval mode a
    fresh net's running statistics are (0, 1) and the gain-0.02 convs shrink activations to ~1e-14.)"""
    torch.manual_seed(seed)
    model = FuseNetI(C, WIDTH, dropout=0.0) if kind == "i" else FuseNetBranch(C, kind, WIDTH, dropout=0.0)
    return init_fusenet(model, None, "authors").train()


def _inputs(kind: str, h: int = H, w: int = W, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    rgb, depth = torch.rand(B, 3, h, w, generator=gen), torch.rand(B, 1, h, w, generator=gen)
    return {"i": (rgb, depth), "rgb": (rgb,), "depth": (depth,)}[kind]


# --------------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("kind, expected", [("rgb", 29_466_665), ("depth", 29_465_513), ("i", 44_188_649)])
def test_parameter_counts_at_width_1_equal_the_spec(kind, expected):
    """The spec's counts at width 1, 41 classes, built on the meta device (no memory)."""
    with torch.device("meta"):
        if kind == "i":
            model = build_fusenet_i(C, [(3, 480, 640), (1, 480, 640)])
        else:
            model = build_fusenet_branch(C, [(3 if kind == "rgb" else 1, 480, 640)], kind)
    assert _count(model) == expected


def test_depth_branch_differs_from_rgb_only_in_its_first_conv():
    """1 input channel instead of 3: 2·64·3·3 = 1,152 weights fewer."""
    assert 29_466_665 - 29_465_513 == 2 * 64 * 9
    rgb, depth = _tiny("rgb"), _tiny("depth")
    assert _count(rgb) - _count(depth) == 2 * 4 * 9
    assert rgb.CBR1_RGB_ENC[0].in_channels == 3 and depth.CBR1_DEPTH_ENC[0].in_channels == 1


# Spec shapes at 480×640 (official-mst-spec.md §3.5 and §4.1, baselines-spec.md §1.8, the decoder table);
# channels scale by the width (except the 41 logits), H and W by the resolution.
_ENC = {1: (64, 480, 640), 2: (128, 240, 320), 3: (256, 120, 160), 4: (512, 60, 80), 5: (512, 30, 40)}
_DEC = {5: (512, 30, 40), 4: (256, 60, 80), 3: (128, 120, 160), 2: (64, 240, 320), 1: (41, 480, 640)}
SPEC_SHAPES = {
    "rgb": {**{f"CBR{k}_RGB_ENC": s for k, s in _ENC.items()}, **{f"CBR{k}_RGB_DEC": s for k, s in _DEC.items()},
            "CBR1_RGB_DEC.0": (64, 480, 640)},
    "depth": {**{f"CBR{k}_DEPTH_ENC": s for k, s in _ENC.items()}, **{f"CBR{k}_D_DEC": s for k, s in _DEC.items()},
              "CBR1_D_DEC.0": (64, 480, 640)},
    "i": {**{f"CBR{k}_RGB_ENC": s for k, s in _ENC.items()}, **{f"CBR{k}_DEPTH_ENC": s for k, s in _ENC.items()},
          **{f"CBR{k}_RGBD_DEC": s for k, s in _DEC.items()}, "after_fusion_identity": (512, 15, 20)},
}


def _scaled(shape: tuple[int, int, int], h: int, w: int) -> tuple[int, ...]:
    c, sh, sw = shape
    return (B, c if c == 41 else c // 16, sh * h // 480, sw * w // 640)


@pytest.mark.parametrize("h, w", [(32, 64), (64, 64)])
@pytest.mark.parametrize("kind", ["rgb", "depth", "i"])
def test_logits_and_every_hook_shape_match_the_spec(kind, h, w):
    """At width 1/16 every tapped module exists and outputs the spec's shape scaled by width and resolution."""
    model = _tiny(kind, h=h, w=w).eval()
    modules = dict(model.named_modules())
    seen = {}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
               for name in SPEC_SHAPES[kind]]
    with torch.no_grad():
        logits = model(*_inputs(kind, h, w))
    for handle in handles:
        handle.remove()
    assert logits.shape == (B, C, h, w)
    assert {name: tuple(s) for name, s in seen.items()} == {
        name: _scaled(shape, h, w) for name, shape in SPEC_SHAPES[kind].items()}


def test_authors_hook_names_of_the_taps_lists_exist():
    """Every name of the §4.1 hook table and the FitNets taps list is a module of the right model."""
    taps = {"rgb": ["CBR4_RGB_ENC", "CBR5_RGB_ENC", "CBR4_RGB_DEC", "CBR5_RGB_DEC", "CBR2_RGB_DEC",
                    "CBR1_RGB_DEC.0", "CBR2_RGB_ENC"],
            "depth": ["CBR4_DEPTH_ENC", "CBR5_DEPTH_ENC", "CBR4_D_DEC", "CBR5_D_DEC", "CBR2_D_DEC", "CBR1_D_DEC.0",
                      "CBR2_DEPTH_ENC"],
            "i": ["after_fusion_identity", "CBR5_RGBD_DEC", "CBR2_RGBD_DEC"]}
    for kind, names in taps.items():
        modules = dict(_tiny(kind).named_modules())
        assert all(name in modules for name in names), kind
    assert isinstance(_tiny("i").after_fusion_identity, nn.Identity)


# --------------------------------------------------------------------------------------------- structure

_BRANCH_CALLS = ["CBR1_{e}", "pool1{p}", "CBR2_{e}", "pool2{p}", "CBR3_{e}", "pool3{p}", "dropout3{p}",
                 "CBR4_{e}", "pool4{p}", "dropout4{p}", "CBR5_{e}", "pool5{p}", "dropout5{p}",
                 "unpool5_{u}", "CBR5_{d}", "dropout5_dec_{u}", "unpool4_{u}", "CBR4_{d}", "dropout4_dec_{u}",
                 "unpool3_{u}", "CBR3_{d}", "dropout3_dec_{u}", "unpool2_{u}", "CBR2_{d}", "unpool1_{u}", "CBR1_{d}"]
EXPECTED_CALLS = {
    "rgb": [s.format(e="RGB_ENC", p="", u="rgb", d="RGB_DEC") for s in _BRANCH_CALLS],
    "depth": [s.format(e="DEPTH_ENC", p="_d", u="d", d="D_DEC") for s in _BRANCH_CALLS],
    # depth encoder first (stage 5 not pooled), then the RGB encoder, then the RGBD decoder
    "i": ["CBR1_DEPTH_ENC", "pool1_d", "CBR2_DEPTH_ENC", "pool2_d", "CBR3_DEPTH_ENC", "pool3_d", "dropout3_d",
          "CBR4_DEPTH_ENC", "pool4_d", "dropout4_d", "CBR5_DEPTH_ENC",
          "CBR1_RGB_ENC", "pool1", "CBR2_RGB_ENC", "pool2", "CBR3_RGB_ENC", "pool3", "dropout3",
          "CBR4_RGB_ENC", "pool4", "dropout4", "CBR5_RGB_ENC", "pool5", "dropout5", "after_fusion_identity",
          "unpool5", "CBR5_RGBD_DEC", "dropout5_dec", "unpool4", "CBR4_RGBD_DEC", "dropout4_dec",
          "unpool3", "CBR3_RGBD_DEC", "dropout3_dec", "unpool2", "CBR2_RGBD_DEC", "unpool1", "CBR1_RGBD_DEC"],
}


@pytest.mark.parametrize("kind", ["rgb", "depth", "i"])
def test_forward_calls_every_top_level_module_once_in_the_authors_order(kind):
    """Dropout after pools 3-5 and decoder steps 5-3; every top-level module is used, exactly once."""
    model = _tiny(kind).eval()
    calls = []
    for name, child in model.named_children():
        child.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    with torch.no_grad():
        model(*_inputs(kind))
    assert calls == EXPECTED_CALLS[kind]
    assert sorted(calls) == sorted(name for name, _ in model.named_children())


def _record(model: nn.Module, names: list[str], pre: bool = False) -> dict[str, object]:
    """Outputs (or, with `pre`, inputs) of the named modules during the next forward."""
    store: dict[str, object] = {}
    modules = dict(model.named_modules())
    for name in names:
        if pre:
            modules[name].register_forward_pre_hook(lambda m, i, name=name: store.__setitem__(name, i))
        else:
            modules[name].register_forward_hook(lambda m, i, o, name=name: store.__setitem__(name, o))
    return store


def test_fusenet_i_fuses_by_averaging_before_each_pool():
    """The tensor entering pool k is (CBRk_RGB_ENC + CBRk_DEPTH_ENC)/2; the RGB hook sees the un-averaged map."""
    model = _tiny_train("i")
    rgb_out = _record(model, [f"CBR{k}_RGB_ENC" for k in range(1, 6)])
    depth_out = _record(model, [f"CBR{k}_DEPTH_ENC" for k in range(1, 6)])
    pool_in = _record(model, [f"pool{k}" for k in range(1, 6)], pre=True)
    fused_out = _record(model, ["after_fusion_identity"])
    with torch.no_grad():
        model(*_inputs("i"))
    for k in range(1, 6):
        r, d, entering = rgb_out[f"CBR{k}_RGB_ENC"], depth_out[f"CBR{k}_DEPTH_ENC"], pool_in[f"pool{k}"][0]
        assert torch.allclose(entering, (r + d) / 2, atol=0, rtol=0)
        assert (entering - r).abs().max() > 0.1 * r.abs().max()  # the hook saw the map before averaging
    # with dropout off, after_fusion_identity is pool5 of the fused stage-5 map: (B, 32, 1, 2)
    fused5 = (rgb_out["CBR5_RGB_ENC"] + depth_out["CBR5_DEPTH_ENC"]) / 2
    assert torch.equal(fused_out["after_fusion_identity"], F.max_pool2d(fused5, 2))
    assert fused_out["after_fusion_identity"].shape == (B, 32, 1, 2)


def test_fusenet_i_unpools_with_the_rgb_path_indices():
    """unpool k receives the indices of the RGB pool k, not of the depth pool k (which differ on these inputs)."""
    model = _tiny_train("i")
    rgb_pool = _record(model, [f"pool{k}" for k in range(1, 6)])
    depth_pool = _record(model, [f"pool{k}_d" for k in range(1, 5)])
    unpool_in = _record(model, [f"unpool{k}" for k in range(1, 6)], pre=True)
    with torch.no_grad():
        model(*_inputs("i"))
    for k in range(1, 6):
        indices = unpool_in[f"unpool{k}"][1]
        assert indices is rgb_pool[f"pool{k}"][1]
        if k < 5:
            assert not torch.equal(indices, depth_pool[f"pool{k}_d"][1])
    assert "pool5_d" not in dict(model.named_modules())  # the depth path's stage 5 is not pooled


@pytest.mark.parametrize("kind, pool, unpool", [("rgb", "pool{}", "unpool{}_rgb"), ("depth", "pool{}_d", "unpool{}_d")])
def test_branches_unpool_with_their_own_encoder_indices(kind, pool, unpool):
    """In a branch, unpool k gets pool k's indices; unpool 5 restores the stage-5 size (B, 32, H/16, W/16)."""
    model = _tiny_train(kind)
    pools = _record(model, [pool.format(k) for k in range(1, 6)])
    unpools = _record(model, [unpool.format(k) for k in range(1, 6)])
    unpools_in = _record(model, [unpool.format(k) for k in range(1, 6)], pre=True)
    with torch.no_grad():
        model(*_inputs(kind))
    for k in range(1, 6):
        assert unpools_in[unpool.format(k)][1] is pools[pool.format(k)][1]
    assert unpools[unpool.format(5)].shape == (B, 32, H // 16, W // 16)


# --------------------------------------------------------------------------------------------- training behaviour

@pytest.mark.parametrize("kind", ["rgb", "depth", "i"])
def test_gradient_reaches_every_parameter(kind):
    """One backward of the ignore-void CE in train mode gives every parameter a non-zero gradient."""
    model = _tiny(kind).train()
    target = torch.randint(0, C, (B, H, W), generator=torch.Generator().manual_seed(2))
    F.cross_entropy(model(*_inputs(kind)), target, ignore_index=0).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("kind", ["rgb", "i"])
def test_dropout_is_active_in_train_mode_only(kind):
    """Two train forwards differ (dropout), two eval forwards are equal; with p = 0 two train forwards agree."""
    model, x = _tiny(kind), _inputs(kind)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 6 if kind == "rgb" else 8
    assert all(m.p == 0.4 for m in dropouts)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(*x), model(*x))
        model.eval()
        assert torch.equal(model(*x), model(*x))
        no_drop = FuseNetI(C, WIDTH, dropout=0.0) if kind == "i" else FuseNetBranch(C, kind, WIDTH, dropout=0.0)
        no_drop.train()
        assert torch.equal(no_drop(*x), no_drop(*x))


def test_width_scales_every_channel_but_inputs_and_classes():
    """channels = max(1, round(c · width)): width 1/100 gives 1 (64·0.01 rounds to 1) ... 5 (512·0.01)."""
    model = FuseNetBranch(7, "depth", width=0.01)
    assert [model.CBR1_DEPTH_ENC[0].in_channels, model.CBR1_DEPTH_ENC[0].out_channels] == [1, 1]
    assert model.CBR3_DEPTH_ENC[0].out_channels == 3 and model.CBR5_DEPTH_ENC[6].out_channels == 5
    assert model.CBR1_D_DEC[3].out_channels == 7
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 7, 32, 32)


# --------------------------------------------------------------------------------------------- initialisation

def _xavier_std(conv: nn.Conv2d) -> float:
    fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
    return 0.02 * math.sqrt(2 / (fan_in + fan_out))


def _check_authors_init(model: nn.Module, skip: tuple[nn.Module, ...] = ()) -> None:
    """Convs ~ xavier_normal(gain 0.02) with bias 0; BN weight ~ N(1, 0.02), bias 0."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and all(m is not s for s in skip)]
    z = torch.cat([(m.weight / _xavier_std(m)).flatten() for m in convs])
    assert abs(z.std().item() - 1) < 0.03 and abs(z.mean().item()) < 0.03
    for m in convs:
        if m.weight.numel() >= 2000:  # per layer where the sample is large enough for a 10 % check
            assert abs(m.weight.std().item() / _xavier_std(m) - 1) < 0.1
        assert torch.count_nonzero(m.bias) == 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    gammas = torch.cat([m.weight for m in bns])
    assert (gammas - 1).abs().max() < 0.02 * 6 and abs((gammas - 1).std().item() - 0.02) < 0.004
    assert all(torch.count_nonzero(m.bias) == 0 for m in bns)


@pytest.mark.parametrize("kind", ["rgb", "depth", "i"])
def test_authors_init_statistics(kind):
    """Without a file, init='authors' is the authors' init_net on every module."""
    with torch.no_grad():
        _check_authors_init(_tiny(kind))


def test_same_seed_same_weights():
    """The build consumes only the torch RNG: equal seeds give equal weights."""
    a, b = _tiny("i", seed=3), _tiny("i", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_vgg16_mapping_follows_the_torchvision_feature_indices():
    """Encoder convs sit at Sequential indices 0, 3, 6 of each stage; VGG16 convs at features 0, 2, 5, ..., 28."""
    stages = [("CBR1", 2, [0, 2]), ("CBR2", 2, [5, 7]), ("CBR3", 3, [10, 12, 14]), ("CBR4", 3, [17, 19, 21]),
              ("CBR5", 3, [24, 26, 28])]
    expected = {f"{s}_DEPTH_ENC.{3 * j}": f"features.{i}" for s, n, idx in stages for j, i in zip(range(n), idx)}
    assert vgg16_conv_mapping(_tiny("depth")) == expected
    both = vgg16_conv_mapping(_tiny("i"))
    assert len(both) == 26 and both["CBR5_RGB_ENC.6"] == "features.28" and both["CBR1_DEPTH_ENC.0"] == "features.0"


VGG_OUTS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
VGG_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def _fake_vgg16(gen: torch.Generator, last: int = 13) -> dict[str, torch.Tensor]:
    """A state dict with torchvision VGG16's conv keys and shapes (random values), first `last` convs."""
    state, c_in = {}, 3
    for index, c_out in list(zip(VGG_INDICES, VGG_OUTS))[:last]:
        state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen)
        state[f"features.{index}.bias"] = torch.randn(c_out, generator=gen)
        c_in = c_out
    return state


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _fake_vgg16(torch.Generator().manual_seed(5))
    state["classifier.0.weight"] = torch.zeros(2, 2)  # the real file also holds the classifier; it is ignored
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, state


def test_init_vgg16_keeps_the_copied_encoder_convs(vgg16_file):
    """At width 1 on a CPU: the 26 encoder convs equal VGG16 (depth conv1 = kernel averaged over RGB), the rest
    is re-initialised as the authors do."""
    path, state = vgg16_file
    torch.manual_seed(0)
    model = build_fusenet_i(C, [(3, 32, 32), (1, 32, 32)], width=1, vgg16_weights=path, init="vgg16")
    modules = dict(model.named_modules())
    for name, prefix in vgg16_conv_mapping(model).items():
        weight = state[f"{prefix}.weight"]
        if name == "CBR1_DEPTH_ENC.0":
            weight = weight.mean(dim=1, keepdim=True)
            assert torch.allclose(modules[name].weight[3, 0], state["features.0.weight"][3].sum(0) / 3)
        assert torch.equal(modules[name].weight, weight), name
        assert torch.equal(modules[name].bias, state[f"{prefix}.bias"]), name
    kept = tuple(modules[name] for name in vgg16_conv_mapping(model))
    with torch.no_grad():
        _check_authors_init(model, skip=kept)


def test_init_authors_overwrites_the_vgg16_copy(vgg16_file):
    """Q12: with a file, init='authors' copies VGG16 and then re-initialises every conv (nothing of it is left)."""
    path, state = vgg16_file
    torch.manual_seed(0)
    model = build_fusenet_branch(C, [(3, 32, 32)], "rgb", width=1, vgg16_weights=path, init="authors")
    assert not torch.allclose(model.CBR1_RGB_ENC[0].weight, state["features.0.weight"])
    with torch.no_grad():
        _check_authors_init(model)


# --------------------------------------------------------------------------------------------- errors

def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _meta_width1(kind: str = "rgb") -> nn.Module:
    """A width-1 model without memory: errors from the file are raised before any copy."""
    with torch.device("meta"):
        return FuseNetBranch(C, kind) if kind != "i" else FuseNetI(C)


def test_missing_file_says_what_to_place_where(tmp_path):
    """A missing file names the file to place, where, and the switch that goes without it."""
    path = tmp_path / "weights" / "vgg16-397923af.pth"
    with pytest.raises(DataError) as error:
        init_fusenet(_meta_width1(), path, "authors")
    message = _one_line(error)
    assert f"place torchvision's vgg16-397923af.pth at {path}" in message
    assert "set fusenet vgg16_weights: none" in message


@pytest.mark.parametrize("content, expected", [
    ({"features.0.weight": torch.zeros(64, 3, 3, 3)}, "key 'features.0.bias' missing"),
    ({"features.0.weight": torch.zeros(64, 3, 5, 5)},
     "features.0.weight has shape (64, 3, 5, 5), expected (64, 3, 3, 3)"),
    ({"features.0.weight": [1.0]}, "features.0.weight has shape list"),
    ([torch.zeros(1)], "holds a list, expected a VGG16 state dict"),
    ({"features.0.weight": Path("x")}, "not a readable torch state dict"),  # weights_only refuses other objects
])
def test_bad_files_are_one_line_data_errors(tmp_path, content, expected):
    """Missing keys, wrong shapes, non-tensors, non-dicts and non-tensor objects: one line naming the file."""
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(content, path)
    with pytest.raises(DataError) as error:
        init_fusenet(_meta_width1(), path, "vgg16")
    assert expected in _one_line(error) and str(path) in str(error.value)


def test_later_key_with_a_wrong_shape_is_named(tmp_path):
    """The first bad key is named with its shape and the expected one (conv2_1 fed 32 channels)."""
    state = _fake_vgg16(torch.Generator().manual_seed(0), last=3)
    state["features.5.weight"] = torch.zeros(128, 32, 3, 3)
    path = tmp_path / "v.pth"
    torch.save(state, path)
    with pytest.raises(DataError, match=r"features\.5\.weight has shape \(128, 32, 3, 3\), expected \(128, 64, 3, 3\)"):
        init_fusenet(_meta_width1("i"), path, "authors")


def test_garbage_file_is_a_data_error(tmp_path):
    """Bytes that are not a torch file are a DataError, not a traceback from the unpickler."""
    path = tmp_path / "vgg16-397923af.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable torch state dict"):
        init_fusenet(_meta_width1(), path, "authors")


def test_width_below_1_with_a_file_is_refused(tmp_path):
    """VGG16 cannot be copied into a narrower net (checked before the file is read)."""
    with pytest.raises(ParamsError) as error:
        build_fusenet_branch(C, [(3, 32, 32)], "rgb", width=WIDTH, vgg16_weights=tmp_path / "none.pth")
    assert "fusenet.width: 0.0625" in _one_line(error) and "width 1" in str(error.value)


def test_init_choices_are_checked():
    """init="vgg16" needs a file; an unknown init is named with the choices."""
    with pytest.raises(ParamsError) as error:
        build_fusenet_branch(C, [(1, 32, 32)], "depth", width=WIDTH, init="vgg16")
    assert "fusenet.init: 'vgg16'" in _one_line(error) and "vgg16_weights" in str(error.value)
    with pytest.raises(ParamsError) as error:
        build_fusenet_i(C, [(3, 32, 32), (1, 32, 32)], width=WIDTH, init="imagenet")
    assert "fusenet.init: 'imagenet'; expected one of 'authors', 'vgg16'" == _one_line(error)


@pytest.mark.parametrize("build, shapes", [
    ("i", [(3, 480, 650), (1, 480, 650)]),
    ("i", [(3, 64, 64), (3, 64, 64)]),
    ("i", [(3, 64, 64), (1, 32, 64)]),
    ("i", [(3, 64, 64)]),
    ("rgb", [(1, 64, 64)]),
    ("depth", [(1, 64, 48)]),
    ("depth", [(64, 64)]),
])
def test_input_shapes_are_checked(build, shapes):
    """(3,H,W) / (1,H,W) with H, W multiples of 32, else one line naming the shapes."""
    with pytest.raises(DataError) as error:
        if build == "i":
            build_fusenet_i(C, shapes, width=WIDTH)
        else:
            build_fusenet_branch(C, shapes, build, width=WIDTH)
    message = _one_line(error)
    assert str([tuple(s) for s in shapes]) in message and "multiples of 32" in message


def test_bad_width_modality_and_dropout():
    """width > 0, dropout in [0, 1), modality rgb|depth."""
    with pytest.raises(ParamsError, match="fusenet.width: 0"):
        FuseNetI(C, width=0)
    with pytest.raises(ParamsError, match="fusenet.dropout: 1.0"):
        FuseNetBranch(C, "rgb", dropout=1.0)
    with pytest.raises(ValueError, match="modality 'thermal'"):
        build_fusenet_branch(C, [(3, 32, 32)], "thermal")


def test_module_names_come_from_a_meta_model_without_random_draws():
    """Params validation lists FuseNet's module names on the meta device in every stage: nothing is drawn there
    (the draws cost ~2 s a stage), and the names equal a real network's."""
    from pipeline.models import registry

    registry._NAMES_CACHE.pop("fusenet_i", None)
    before = torch.random.get_rng_state()
    names = registry.module_names("fusenet_i")
    assert torch.equal(torch.random.get_rng_state(), before)
    real = registry.build_network("fusenet_i", ["m1", "m2"], C, [(3, 32, 32), (1, 32, 32)], {"width": 0.0625})
    assert names == [name for name, _ in real.body.named_modules() if name]
    assert next(real.parameters()).abs().sum() > 0   # a real network is still initialised
