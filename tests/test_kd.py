"""KD: the loss against hand-computed values, its α schedule, the output cache (frozen teachers and
cache == recompute for every pair: tests/test_method_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.methods.common.kl import hinton_kd_loss
from pipeline.methods.kd import KnowledgeDistillation
from pipeline.training.engine import train
from tests.conftest import method_block, method_setup, run_context, synthetic_dataset, synthetic_split



def _softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation():
    """T²·KL(p_t ‖ p_s) on T-softened distributions, averaged over the batch."""
    student = [[1.0, 2.0, 3.0], [0.5, 0.0, -0.5]]
    teacher = [[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]]
    T = 4.0
    expected = 0.0
    for s, t in zip(student, teacher):
        p_s, p_t = _softmax(s, T), _softmax(t, T)
        expected += sum(pt * (math.log(pt) - math.log(ps)) for ps, pt in zip(p_s, p_t))
    expected = expected / len(student) * T**2
    got = hinton_kd_loss(torch.tensor(student), torch.tensor(teacher), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # first row by hand: p_t = softmax([.75, .5, .25]) and p_s is its reverse, so the middle term vanishes
    # and log(p_t1/p_s1) = 0.5 = -log(p_t3/p_s3): KL = 0.5·(p_t1 − p_t3), times T² = 16  (≈ 1.3196)
    z = math.exp(0.75) + math.exp(0.5) + math.exp(0.25)
    by_hand = 16 * 0.5 * (math.exp(0.75) - math.exp(0.25)) / z
    assert by_hand == pytest.approx(1.3196, abs=1e-4)
    assert hinton_kd_loss(torch.tensor(student[:1]), torch.tensor(teacher[:1]), T).item() == pytest.approx(
        by_hand, rel=1e-6)


def test_kd_loss_is_zero_for_identical_logits_and_detaches_teacher():
    logits = torch.randn(5, 10, requires_grad=True)
    teacher = logits.detach().clone().requires_grad_(True)
    loss = hinton_kd_loss(logits, teacher, 4.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    hinton_kd_loss(logits * 2, teacher, 4.0).backward()
    assert teacher.grad is None and logits.grad is not None


def test_authors_alpha_schedule_halves_every_30_epochs():
    schedule = AlphaParams(0.5, "authors_step", 30, 0.5)
    assert [schedule(e) for e in (0, 29, 30, 59, 60, 89, 90, 99)] == [0.5, 0.5, 0.25, 0.25, 0.125, 0.125,
                                                                        0.0625, 0.0625]
    assert AlphaParams(0.5, "constant")(99) == 0.5
    assert AlphaParams(0.5) == schedule  # the defaults are the authors' schedule
    block = method_block("kd")  # the real params.yaml block: the authors' KD
    assert block.teachers == ["mm", "cm"] and block.temperature == 4.0 and block.alpha == schedule
    assert schedule.epoch_values(30) == {"alpha": 0.25}


def _kd_method(data, cache: bool, alpha: float = 0.5):
    setup = method_setup("kd", "mm", "m2", data, cache=cache, block=method_block("kd", alpha=AlphaParams(alpha)))
    return KnowledgeDistillation.from_setup(setup)


def test_loss_terms_are_weighted_by_alpha():
    data = synthetic_dataset()
    method = _kd_method(data, cache=False, alpha=0.3)
    assert method.temperature == 4.0
    batch = data.batch(torch.arange(8))
    terms = method.loss_terms(batch, epoch=0)
    assert set(terms) == {"ce", "kd"}
    logits = method.student(batch)
    assert terms["ce"].item() == pytest.approx(0.7 * F.cross_entropy(logits, batch["y"]).item(), rel=1e-5)
    teacher_logits = method.teacher(batch)
    assert terms["kd"].item() == pytest.approx(0.3 * hinton_kd_loss(logits, teacher_logits, 4.0).item(), rel=1e-5)
    assert method.epoch_values(30) == {"alpha": 0.15}


def test_cached_teacher_logits_equal_recomputed_ones():
    data = synthetic_dataset()
    teacher = _kd_method(data, cache=True).teacher
    split = synthetic_split()
    cached, fresh = FrozenOutputs(teacher, enabled=True), FrozenOutputs(teacher, enabled=False)
    cached.prepare(data, split["train"])
    for batch in data.batches(split["train"], 7, torch.Generator().manual_seed(1)):
        torch.testing.assert_close(cached(batch), fresh(batch), rtol=1e-5, atol=1e-6)


def test_kd_training_with_cache_equals_training_without():
    """Same seed, same data: caching the teacher changes nothing in the student's training."""
    data = synthetic_dataset()
    split = synthetic_split()
    results = []
    for cache in (True, False):
        method = _kd_method(data, cache=cache)
        torch.manual_seed(1)
        results.append(train(method, run_context(data, split, epochs=3, batch_size=16, lr=3e-3)))
    cached, recomputed = results
    assert [p.name for p in cached.phases] == [p.name for p in recomputed.phases] == ["main"]
    assert len(cached.final.history) == 3
    for a, b in zip(cached.final.history, recomputed.final.history, strict=True):
        assert a.keys() == b.keys()
        assert {"train_loss", "train_ce", "train_kd", "val_loss", "val_accuracy", "alpha", "best_epoch"} <= a.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert cached.final.best_epoch == recomputed.final.best_epoch
    assert cached.test["student"].accuracy == recomputed.test["student"].accuracy


def test_cache_lookup_before_prepare_is_an_error():
    data = synthetic_dataset()
    outputs = FrozenOutputs(_kd_method(data, cache=True).teacher, enabled=True)
    with pytest.raises(RuntimeError, match="prepare"):
        outputs(data.batch(torch.arange(4)))
