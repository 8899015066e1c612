"""OFA: the per-branch loss against an explicit formula, projector shapes and init, taps, the method end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pipeline.methods.common.base import MethodSetup, TrainContext, check_teacher_config
from pipeline.methods.kd import AlphaSchedule
from pipeline.methods.ofa import OFAParams, OneForAll, build_projector, ofa_loss, pair_key
from pipeline.models.registry import build_network
from pipeline.models.taps import FeatureTaps
from pipeline.params import _parse
from tests.conftest import synthetic_dataset, synthetic_split

PARAMS_BLOCK = """
teachers:
- mm
- cm
taps:
  av_digits:
    mm_to_m1: [conv1, conv2, fc1]
    mm_to_m2: [conv1, conv2, conv3]
    m2_to_m1: [conv1, conv2, fc1]
    m1_to_m2: [conv1, conv2, conv3]
  av_mnist:
    mm_to_m1: [conv1, conv2, fc1]
    mm_to_m2: [conv1, conv2, conv3]
    m2_to_m1: [conv1, conv2, fc1]
    m1_to_m2: [conv1, conv2, conv3]
eps: 1.1
temperature: 1.0
alpha: 0.5
alpha_schedule: authors_step
alpha_decay_every: 30
alpha_decay_factor: 0.5
aggregation: mean
logit_term: false
"""


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids thread contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# per-batch tap shapes on AV-Digits (16×16 spectrograms) and AV-MNIST (112×112)
TAP_SHAPES = [(6, 28, 28), (16, 10, 10), (120, 1, 1), (84,), (32, 16, 16), (64, 8, 8), (128, 4, 4), (128, 2, 2),
              (512,), (64, 56, 56)]


@pytest.mark.parametrize("shape", TAP_SHAPES)
def test_projector_outputs_class_logits(shape):
    torch.manual_seed(0)
    projector = build_projector(torch.Size((2, *shape)), 10)
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


def test_projector_on_the_av_digits_student_taps():
    """Real tap outputs, incl. the small 2-D maps (LeNet conv2 16×10×10, ThreeLayerCNN-A conv3 128×4×4)."""
    torch.manual_seed(0)
    nets = {"m1": (build_network("lenet5", ["m1"], 10, [(1, 28, 28)]), ["conv1", "conv2", "fc1"]),
            "m2": (build_network("three_layer_cnn_a", ["m2"], 10, [(1, 16, 16)]), ["conv1", "conv2", "conv3"])}
    batch = synthetic_dataset(n=20).batch(torch.arange(5))
    expected = {"m1": [(6, 28, 28), (16, 10, 10), (84,)], "m2": [(32, 16, 16), (64, 8, 8), (128, 4, 4)]}
    for role, (net, taps) in nets.items():
        with FeatureTaps(net.body, taps) as recorded:
            net(batch)
        assert [tuple(recorded[n].shape[1:]) for n in taps] == expected[role]
        for name in taps:
            assert build_projector(recorded[name].shape, 10)(recorded[name]).shape == (5, 10)


def test_params_block_parses():
    p = _parse(OFAParams, yaml.safe_load(PARAMS_BLOCK), "ofa", "test")
    assert p.teachers == ["mm", "cm"] and p.eps == 1.1 and p.temperature == 1.0
    assert p.taps["av_mnist"]["m2_to_m1"] == ["conv1", "conv2", "fc1"]
    assert p.aggregation == "mean" and p.logit_term is False
    assert p.schedule() == AlphaSchedule(0.5, "authors_step", 30, 0.5)


def test_pair_keys():
    assert [pair_key(c, t) for c in ("mm", "cm") for t in ("m1", "m2")] == ["mm_to_m1", "mm_to_m2", "m2_to_m1",
                                                                            "m1_to_m2"]


def _setup(data, split, config, target, cache=True, dataset="av_digits", **overrides):
    torch.manual_seed(0)
    shapes = {"m1": (1, 28, 28), "m2": (1, 16, 16)}
    archs = {"m1": "lenet5", "m2": "three_layer_cnn_a"}

    def build(role):
        if role == "mm":
            return build_network("cnn_i", ["m1", "m2"], 10, [shapes["m1"], shapes["m2"]])
        return build_network(archs[role], [role], 10, [shapes[role]])

    teacher = build("mm" if config == "mm" else ("m2" if target == "m1" else "m1"))
    raw = {**yaml.safe_load(PARAMS_BLOCK), **overrides}
    params = _parse(OFAParams, raw, "ofa", "test")
    return MethodSetup(student=build(target), teacher=teacher, teacher_config=config, target=target,
                       dataset=dataset, num_classes=10, sample=data.batch(split["train"][:4]),
                       build_network=build, method_params=params, cache_frozen_outputs=cache)


def _context(data, split):
    return TrainContext(data, split, 16, 2, 1e-3, 10, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", ["mm", "cm"])
@pytest.mark.parametrize("target", ["m1", "m2"])
def test_method_trains_projectors_and_teacher_stays_frozen(config, target):
    data, split = synthetic_dataset(), synthetic_split()
    method = OneForAll.from_setup(_setup(data, split, config, target))
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
        method = OneForAll.from_setup(_setup(data, split, "mm", "m1", cache=cache))
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
    assert values[True]["ofa"] == pytest.approx(alpha * sum(branches) / 3, rel=1e-5)
    assert values[True]["ce"] == pytest.approx((1 - alpha) * F.cross_entropy(logits, batch["y"]).item(), rel=1e-5)

    official = OneForAll.from_setup(_setup(data, split, "mm", "m1", aggregation="sum", logit_term=True))
    official.prepare(_context(data, split))
    official.eval()
    terms = {k: v.item() for k, v in official.loss_terms(batch, 60).items()}
    assert terms["ofa"] == pytest.approx(alpha * sum(branches), rel=1e-5)  # same seed: same projectors
    assert terms["ofa_logits"] == pytest.approx(alpha * ofa_loss(logits, teacher_logits, batch["y"], 1.1).item(),
                                                rel=1e-5)


def test_missing_taps_and_unknown_modules_are_clear_errors():
    data, split = synthetic_dataset(), synthetic_split()
    with pytest.raises(KeyError, match="ofa.taps.ravdess is missing"):
        OneForAll.from_setup(_setup(data, split, "mm", "m1", dataset="ravdess"))
    partial = {"av_digits": {"mm_to_m2": ["conv1"]}}
    with pytest.raises(KeyError, match="ofa.taps.av_digits.mm_to_m1 is missing"):
        OneForAll.from_setup(_setup(data, split, "mm", "m1", taps=partial))
    with pytest.raises(KeyError, match="no module named 'conv9'"):
        OneForAll.from_setup(_setup(data, split, "cm", "m2", taps={"av_digits": {"m1_to_m2": ["conv1", "conv9"]}}))


def test_unsupported_teacher_config_is_rejected():
    with pytest.raises(ValueError, match="mm\\+cm"):
        check_teacher_config(OneForAll, "mm+cm")
    check_teacher_config(OneForAll, "mm")
    check_teacher_config(OneForAll, "cm")
