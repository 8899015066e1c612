"""RKD: distance and angle terms against explicit loops, the method built for every architecture pair,
its trainable and frozen parts, cached teacher embeddings, taps and params (frozen parts unchanged and
cache == recompute for every pair: tests/test_method_contract.py)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import check_teacher_config
from pipeline.methods.common.tapped_features import FeatureTap, PairTaps
from pipeline.methods.rkd import (
    RelationalKD,
    RKDParams,
    rkd_angle_loss,
    rkd_distance_loss,
)
from pipeline.params import ParamsError, parse
from pipeline.training.engine import train
from tests.conftest import (method_block, method_setup, raw_params, run_context, synthetic_dataset, synthetic_split,
                            with_tap)



def _params(**changes) -> RKDParams:
    """The real params.yaml block of RKD (shrunk), with `changes`."""
    return method_block("rkd", **changes)


def _smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _dist(u, v) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True)))


def _distance_loss_by_loops(s, t) -> float:
    b = len(s)

    def normalised(x):
        d = [[_dist(x[i], x[j]) if i != j else 0.0 for j in range(b)] for i in range(b)]
        mean = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[d[i][j] / mean for j in range(b)] for i in range(b)]

    ds, dt = normalised(s), normalised(t)
    return sum(_smooth_l1(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / b**2


def _cos(x, i, j, k) -> float:
    u = [a - c for a, c in zip(x[j], x[i], strict=True)]
    v = [a - c for a, c in zip(x[k], x[i], strict=True)]
    nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
    if nu == 0 or nv == 0:
        return 0.0
    return sum(a * c for a, c in zip(u, v, strict=True)) / (nu * nv)


def _angle_loss_by_loops(s, t) -> float:
    b = len(s)
    total = sum(_smooth_l1(_cos(s, i, j, k), _cos(t, i, j, k)) for i, j, k in itertools.product(range(b), repeat=3))
    return total / b**3


def test_distance_and_angle_terms_match_explicit_loops():
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 4.0):  # 4.0 pushes some differences past smooth-L1's β = 1
        s = (torch.randn(5, 3, generator=gen, dtype=torch.float64) * scale)
        t = torch.randn(5, 4, generator=gen, dtype=torch.float64)  # different widths are allowed
        assert rkd_distance_loss(s, t).item() == pytest.approx(_distance_loss_by_loops(s.tolist(), t.tolist()),
                                                               rel=1e-9)
        assert rkd_angle_loss(s, t).item() == pytest.approx(_angle_loss_by_loops(s.tolist(), t.tolist()), rel=1e-9)


def test_relational_terms_vanish_for_similar_structures_and_detach_teacher():
    x = torch.randn(6, 8, dtype=torch.float64)
    s = (3 * x + 1).requires_grad_(True)  # scaled and shifted: same normalised distances and angles
    t = x.clone().requires_grad_(True)
    assert rkd_distance_loss(s, t).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_angle_loss(s, t).item() == pytest.approx(0.0, abs=1e-12)
    (rkd_distance_loss(s * s, t) + rkd_angle_loss(s * s, t)).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()
    one = torch.randn(1, 8, requires_grad=True)
    assert rkd_distance_loss(one, one.detach()).item() == 0.0  # a batch of one has no pairs


def _method(config="mm", target="m2", params=None, cache=True):
    data = synthetic_dataset()
    setup = method_setup("rkd", config, target, data, block=params or _params(), cache=cache)
    return RelationalKD.from_setup(setup), data


def _context(data):
    return run_context(data, synthetic_split(), epochs=2, batch_size=16, lr=1e-2)


def _steps(method, data, n=2):
    method.prepare(_context(data))
    optimizer = method.configure_optimizer(1e-2)
    method.train()
    for step in range(n):
        terms = method.loss_terms(data.batch(synthetic_split()["train"][16 * step:16 * step + 16]), 0)
        loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return terms


@pytest.mark.parametrize("config,target", [("mm", "m1"), ("mm", "m2"), ("cm", "m1"), ("cm", "m2")])
def test_builds_for_every_pair_and_trains_with_a_frozen_teacher(config, target):
    method, data = _method(config, target)
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    embed_before = copy.deepcopy(method.embed_teacher.state_dict())
    student_before = copy.deepcopy(method.student.state_dict())
    terms = _steps(method, data)
    assert set(terms) == {"ce", "rkd_distance", "rkd_angle"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert not method.teacher.training and not method.embed_teacher.training
    for module, before in ((method.teacher, teacher_before), (method.embed_teacher, embed_before)):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in method.student.state_dict().items())
    trainable = {id(p) for p in method.trainable_parameters()}
    assert {id(p) for p in method.embed_student.parameters()} <= trainable
    assert trainable == {id(p) for p in method.student.parameters()} | {id(p) for p in
                                                                          method.embed_student.parameters()}


def test_embedding_widths_follow_the_taps():
    method, _ = _method("mm", "m2")
    assert method.embed_student.linear.in_features == 128 * 2 * 2  # conv3 128×4×4, max-pooled 2×2
    assert method.embed_teacher.linear.in_features == 298           # CNN-I fc1
    method, _ = _method("cm", "m1")
    assert (method.embed_student.linear.in_features, method.embed_teacher.linear.in_features) == (84, 512)


def test_loss_terms_are_weighted_and_match_the_formula():
    method, data = _method("cm", "m2")
    method.prepare(_context(data))
    batch = data.batch(synthetic_split()["train"][:12])
    terms = method.loss_terms(batch, epoch=30)  # α = 0.25 after the first halving
    logits, feature = method.student_tapped(batch)
    e_s = method.embed_student(feature)
    e_t = method.embed_teacher(method.teacher_tapped(batch)[1])
    assert terms["ce"].item() == pytest.approx(0.75 * F.cross_entropy(logits, batch["y"]).item(), rel=1e-5)
    assert terms["rkd_distance"].item() == pytest.approx(0.25 * rkd_distance_loss(e_s, e_t).item(), rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(0.25 * 2 * rkd_angle_loss(e_s, e_t).item(), rel=1e-5)
    assert method.epoch_values(30) == {"alpha": 0.25}
    original, _ = _method("cm", "m2", _params(loss_form="original", distance_weight=25.0, angle_weight=50.0))
    original.prepare(_context(data))
    terms = original.loss_terms(batch, epoch=30)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(original.student(batch), batch["y"]).item(), rel=1e-5)
    assert original.epoch_values(0) == {}


def test_embedding_none_uses_raw_features():
    method, data = _method("mm", "m1", _params(embedding="none"))
    assert not any(True for _ in method.embed_student.parameters())
    method.prepare(_context(data))
    batch = data.batch(synthetic_split()["train"][:8])
    assert torch.allclose(method.teacher_embeddings(batch), method.teacher_tapped(batch)[1], rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(v) for v in _steps(method, data).values())


def test_cached_teacher_embeddings_give_the_same_loss_as_recomputed():
    results = []
    for cache in (True, False):
        method, data = _method("mm", "m2", cache=cache)
        assert method.teacher_embeddings.enabled == cache
        torch.manual_seed(1)
        results.append({k: v.item() for k, v in _steps(method, data).items()})
    for key in results[0]:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-7), key


def test_bad_taps_and_teacher_configs_are_rejected():
    pair = _params().taps["cnn_i"]["lenet5"]
    # a module the architecture does not have: a KeyError naming it when it reaches the method ...
    with pytest.raises(KeyError, match="no module named 'fc9'"):
        _method("mm", "m1", _params(taps={"cnn_i": {"lenet5": with_tap(pair, "teacher", module="fc9")}}))
    # ... and rejected when params.yaml is parsed, naming the key
    raw = raw_params()["rkd"]
    raw["taps"]["cnn_i"]["lenet5"]["teacher"]["module"] = "fc9"
    with pytest.raises(ParamsError, match=r"rkd\.taps\.cnn_i\.lenet5: 'fc9' is not a module of cnn_i"):
        parse(RKDParams, raw, "rkd", "test")
    with pytest.raises(KeyError, match=r"rkd\.taps\.three_layer_cnn_a\.lenet5 is missing"):
        _method("cm", "m1", _params(taps={"cnn_i": {"lenet5": pair}}))  # no row for the teacher architecture
    with pytest.raises(KeyError, match=r"rkd\.taps\.cnn_i\.three_layer_cnn_a is missing"):
        _method("mm", "m2", _params(taps={"cnn_i": {"lenet5": pair}}))  # no entry for the student architecture
    bad_pool = with_tap(pair, "student", pool=2)  # LeNet5 fc1 is (B, 84): nothing to pool
    with pytest.raises(ValueError, match=r"rkd\.taps\.cnn_i\.lenet5\.student\.pool"):
        _method("mm", "m1", _params(taps={"cnn_i": {"lenet5": bad_pool}}))
    check_teacher_config(RelationalKD, "mm")
    check_teacher_config(RelationalKD, "cm")
    with pytest.raises(ValueError, match="does not support teacher config 'mm\\+cm'"):
        check_teacher_config(RelationalKD, "mm+cm")


def test_params_block_parses():
    params = _params()
    assert params.teachers == ["mm", "cm"]
    assert (params.distance_weight, params.angle_weight, params.feat_dim) == (1.0, 2.0, 128)
    assert (params.loss_form, params.embedding) == ("authors", "authors")
    assert params.taps["cnn_i"]["three_layer_cnn_a"].student == FeatureTap("conv3", 2)
    assert params.taps["cnn_i"]["three_layer_cnn_a"].teacher == FeatureTap("fc1", 0)
    assert params.taps["three_layer_cnn_a"]["lenet5"] == PairTaps(FeatureTap("conv3", 2), FeatureTap("fc1", 0))
    assert params.alpha == AlphaParams(0.5, "authors_step", 30, 0.5)
    assert params.alpha(60) == 0.125
    with pytest.raises(ParamsError, match=r"rkd\.embedding"):
        parse(RKDParams, {**raw_params()["rkd"], "embedding": "paper"}, "rkd", "test")


def test_trains_through_the_engine_reproducibly():
    histories = []
    for _ in range(2):
        method, data = _method("mm", "m1")
        result = train(method, run_context(data, synthetic_split(), epochs=2, batch_size=16, lr=1e-2))
        assert [p.name for p in result.phases] == ["main"]
        histories.append(result.final.history)
    assert len(histories[0]) == 2
    assert histories[0] == histories[1]
    assert all(math.isfinite(h["train_rkd_angle"]) for h in histories[0])
