"""OFA: the per-branch loss against an explicit formula, projector shapes and init, taps, the method end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import check_teacher_config
from pipeline.methods.common.features import probe_shapes
from pipeline.methods.ofa import OFAParams, OneForAll, build_projector, ofa_loss
from pipeline.models.taps import FeatureTaps
from pipeline.params import ParamsError, parse
from tests.conftest import method_block, method_setup, raw_params, role_network, run_context, synthetic_dataset, \
    synthetic_split



def _softmax(row, T):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("eps,T", [(1.1, 1.0), (1.0, 1.0), (1.5, 2.0)])
def test_ofa_loss_matches_explicit_formula(eps, T):
    """(1/B) Σ_b −Σ_c [(p_t + y)^ε − y]_c log p_s,c, the label entering the target."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 5, generator=g) * 2, torch.randn(4, 5, generator=g) * 2
    labels = torch.tensor([0, 3, 3, 1])
    expected = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        ps, pt = _softmax(s, T), _softmax(t, T)
        for c in range(5):
            onehot = 1.0 if c == y else 0.0
            expected -= ((pt[c] + onehot) ** eps - onehot) * math.log(ps[c])
    expected /= 4
    assert ofa_loss(student, teacher, labels, eps, T).item() == pytest.approx(expected, rel=1e-5)


def test_ofa_loss_with_eps_one_is_ce_plus_teacher_cross_entropy():
    """ε = 1: the target (p_t + y) − y is p_t itself, so the loss is the soft cross-entropy of KD at T = 1."""
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    soft_ce = -(F.softmax(teacher, 1) * F.log_softmax(student, 1)).sum(1).mean()
    assert ofa_loss(student, teacher, labels, 1.0).item() == pytest.approx(soft_ce.item(), rel=1e-5)


def test_ofa_loss_detaches_teacher():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    ofa_loss(student, teacher, torch.tensor([0, 1, 2]), 1.1).backward()
    assert teacher.grad is None and student.grad is not None


# per-sample tap shapes on AV-Digits (16×16 spectrograms) and AV-MNIST (112×112)
TAP_SHAPES = [(6, 28, 28), (16, 10, 10), (120, 1, 1), (84,), (32, 16, 16), (64, 8, 8), (128, 4, 4), (128, 2, 2),
              (512,), (64, 56, 56)]


@pytest.mark.parametrize("shape", TAP_SHAPES)
def test_projector_outputs_class_logits(shape):
    torch.manual_seed(0)
    projector = build_projector(shape, 10)
    projector.train()
    out = projector(torch.randn(3, *shape))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if len(shape) == 3:  # SepConv(C→2C) then SepConv(2C→2K): 2K channels into Linear(2K→K)
        convs = [m for m in projector.modules() if isinstance(m, nn.Conv2d)]
        assert convs[0].stride == (2, 2) and convs[0].groups == shape[0]
        assert convs[3].out_channels == 2 * shape[0] and convs[-1].out_channels == 20
        assert all(m.bias is None for m in convs)
        assert [(m.in_features, m.out_features) for m in linears] == [(20, 10)]
    else:
        assert [(m.in_features, m.out_features) for m in linears] == [(shape[0], 20), (20, 10)]
    assert all(torch.count_nonzero(m.bias) == 0 and m.weight.abs().max() < 0.15 for m in linears)  # std 0.02


@pytest.mark.parametrize("shape", [(2, 6, 28, 28), (5, 84), ()])
def test_projector_rejects_batch_shapes(shape):
    """build_projector takes a per-sample shape: (C, H, W) or (d,)."""
    with pytest.raises(ValueError, match="per sample"):
        build_projector(shape, 10)


def test_projector_on_the_av_digits_student_taps():
    """Real tap outputs, incl. the small 2-D maps (LeNet conv2 16×10×10, ThreeLayerCNN-A conv3 128×4×4)."""
    torch.manual_seed(0)
    nets = {"m1": (role_network("m1"), ["conv1", "conv2", "fc1"]),
            "m2": (role_network("m2"), ["conv1", "conv2", "conv3"])}
    batch = synthetic_dataset(n=20).batch(torch.arange(5))
    expected = {"m1": [(6, 28, 28), (16, 10, 10), (84,)], "m2": [(32, 16, 16), (64, 8, 8), (128, 4, 4)]}
    for role, (net, taps) in nets.items():
        with FeatureTaps(net.body, taps) as recorded:
            net(batch)
        assert [tuple(recorded[n].shape[1:]) for n in taps] == expected[role]
        assert probe_shapes(net, taps, batch) == dict(zip(taps, expected[role]))  # what from_setup sizes with
        for name in taps:
            assert build_projector(tuple(recorded[name].shape[1:]), 10)(recorded[name]).shape == (5, 10)


def test_params_block_parses():
    p = method_block("ofa")  # the real params.yaml block: the authors' OFA
    assert isinstance(p, OFAParams)
    assert p.teachers == ["mm", "cm"] and p.eps == 1.1 and p.temperature == 1.0
    assert p.taps["three_layer_cnn_a"]["lenet5"] == ["conv1", "conv2", "fc1"]
    assert p.taps["cnn_i"]["three_layer_cnn_a"] == ["conv1", "conv2", "conv3"]
    assert p.aggregation == "mean" and p.logit_term is False
    assert p.alpha == AlphaParams(0.5, "authors_step", 30, 0.5)


# (teacher config, target) -> (teacher architecture, student architecture): the key of the tap table
PAIRS = {("mm", "m1"): ("cnn_i", "lenet5"), ("mm", "m2"): ("cnn_i", "three_layer_cnn_a"),
         ("cm", "m1"): ("three_layer_cnn_a", "lenet5"), ("cm", "m2"): ("lenet5", "three_layer_cnn_a")}


@pytest.mark.parametrize("config,target", list(PAIRS))
def test_taps_are_looked_up_by_architecture_pair(config, target):
    data = synthetic_dataset()
    setup = _setup(data, config, target)
    assert (setup.teacher.arch, setup.student.arch) == PAIRS[config, target]
    method = OneForAll.from_setup(setup)
    teacher_arch, student_arch = PAIRS[config, target]
    assert method.taps == setup.method_params.taps[teacher_arch][student_arch]
    assert len(method.projectors) == len(method.taps)


def _setup(data, config, target, cache=True, **overrides):
    return method_setup("ofa", config, target, data, cache=cache, block=method_block("ofa", **overrides))


def _context(data, split):
    return run_context(data, split, epochs=2, batch_size=16, lr=1e-3)


@pytest.mark.parametrize("config", ["mm", "cm"])
@pytest.mark.parametrize("target", ["m1", "m2"])
def test_method_trains_projectors_and_teacher_stays_frozen(config, target):
    data, split = synthetic_dataset(), synthetic_split()
    method = OneForAll.from_setup(_setup(data, config, target))
    method.prepare(_context(data, split))
    optimizer = method.configure_optimizer(1e-3)
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trainable for p in [*method.student.parameters(), *method.projectors.parameters()])
    assert not any(id(p) in trainable for p in method.teacher.parameters())
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    projectors_before = copy.deepcopy(method.projectors.state_dict())
    method.train()
    for step in range(2):
        terms = method.loss_terms(data.batch(split["train"][16 * step:16 * (step + 1)]), 0)
        assert set(terms) == {"ce", "ofa"}
        loss = torch.stack(list(terms.values())).sum()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not method.teacher.training and method.projectors.training
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in method.teacher.state_dict().items())
    assert any(not torch.equal(projectors_before[k], v) for k, v in method.projectors.state_dict().items())


def test_terms_aggregation_logit_term_and_cache():
    data, split = synthetic_dataset(), synthetic_split()
    batch = data.batch(split["train"][:16])
    values = {}
    for cache in (True, False):
        method = OneForAll.from_setup(_setup(data, "mm", "m1", cache=cache))
        method.prepare(_context(data, split))
        method.eval()  # BN of the projectors in eval: the explicit recomputation below must see the same maps
        values[cache] = {k: v.item() for k, v in method.loss_terms(batch, 60).items()}
    assert values[True] == pytest.approx(values[False], rel=1e-5, abs=1e-7)
    teacher_logits = method.teacher(batch)
    with FeatureTaps(method.student.body, method.taps) as recorded:
        logits = method.student(batch)
    branches = [ofa_loss(proj(recorded[n]), teacher_logits, batch["y"], 1.1).item()
                for n, proj in zip(method.taps, method.projectors)]
    alpha = 0.125
    assert method.epoch_values(60) == {"alpha": alpha}
    assert values[True]["ofa"] == pytest.approx(alpha * sum(branches) / 3, rel=1e-5)
    assert values[True]["ce"] == pytest.approx((1 - alpha) * F.cross_entropy(logits, batch["y"]).item(), rel=1e-5)

    official = OneForAll.from_setup(_setup(data, "mm", "m1", aggregation="sum", logit_term=True))
    official.prepare(_context(data, split))
    official.eval()
    terms = {k: v.item() for k, v in official.loss_terms(batch, 60).items()}
    assert terms["ofa"] == pytest.approx(alpha * sum(branches), rel=1e-5)  # same seed: same projectors
    assert terms["ofa_logits"] == pytest.approx(alpha * ofa_loss(logits, teacher_logits, batch["y"], 1.1).item(),
                                                rel=1e-5)


def test_missing_taps_and_unknown_modules_are_clear_errors():
    data = synthetic_dataset()
    partial = {"cnn_i": {"three_layer_cnn_a": ["conv1"]}}
    with pytest.raises(KeyError, match=r"ofa\.taps\.cnn_i\.lenet5 is missing"):
        OneForAll.from_setup(_setup(data, "mm", "m1", taps=partial))
    with pytest.raises(KeyError, match=r"ofa\.taps\.three_layer_cnn_a\.lenet5 is missing"):
        OneForAll.from_setup(_setup(data, "cm", "m1", taps=partial))  # no row for the teacher architecture
    # a module the architecture does not have: rejected when params.yaml is parsed, naming the key ...
    raw = raw_params()["ofa"]
    raw["taps"]["lenet5"]["three_layer_cnn_a"] = ["conv1", "conv9"]
    with pytest.raises(ParamsError, match=r"ofa\.taps\.lenet5\.three_layer_cnn_a: 'conv9' is not a module"):
        parse(OFAParams, raw, "ofa", "test")
    # ... and, if it reaches the method anyway, a KeyError naming the module
    with pytest.raises(KeyError, match="no module named 'conv9'"):
        OneForAll.from_setup(_setup(data, "cm", "m2", taps={"lenet5": {"three_layer_cnn_a": ["conv1", "conv9"]}}))


def test_unsupported_teacher_config_is_rejected():
    with pytest.raises(ValueError, match="mm\\+cm"):
        check_teacher_config(OneForAll, "mm+cm")
    check_teacher_config(OneForAll, "mm")
    check_teacher_config(OneForAll, "cm")
