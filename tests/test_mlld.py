"""MLLD: each level against explicit loops, both normalisations, the confidence masks, the method end to end."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import check_teacher_config
from pipeline.methods.mlld import (MLLDParams, MultiLevelLogitDistillation, confidence_fractions, mlld_loss,
                                   multi_level_terms)
from pipeline.params import ParamsError, parse
from tests.conftest import method_block, method_setup, raw_params, run_context, synthetic_dataset, synthetic_split

TEMPS = [2.0, 3.0, 4.0, 5.0, 6.0]



def _softmax(row, T):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def _logits(seed=0, b=5, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 2, torch.randn(b, c, generator=g) * 2


def _loop_levels(student, teacher, temps):
    """Per-temperature raw levels with plain Python loops: instance T²·mean_b KL, Σ of squared
    differences of the class (C×C) and batch (B×B) Gram matrices."""
    s, t = student.tolist(), teacher.tolist()
    B, C = len(s), len(s[0])
    out = []
    for T in temps:
        ps = [_softmax(r, T) for r in s]
        pt = [_softmax(r, T) for r in t]
        kl = sum(sum(pt[b][c] * (math.log(pt[b][c]) - math.log(ps[b][c])) for c in range(C)) for b in range(B))
        instance = T**2 * kl / B
        class_sq = 0.0
        for i in range(C):
            for j in range(C):
                gs = sum(ps[b][i] * ps[b][j] for b in range(B))
                gt = sum(pt[b][i] * pt[b][j] for b in range(B))
                class_sq += (gs - gt) ** 2
        batch_sq = 0.0
        for a in range(B):
            for b in range(B):
                gs = sum(ps[a][c] * ps[b][c] for c in range(C))
                gt = sum(pt[a][c] * pt[b][c] for c in range(C))
                batch_sq += (gs - gt) ** 2
        out.append((instance, class_sq, batch_sq))
    return out, B, C


def test_authors_levels_match_explicit_loops():
    student, teacher = _logits()
    raw, B, C = _loop_levels(student, teacher, TEMPS)
    n = 3 * len(TEMPS)
    expected = {"instance": sum(r[0] for r in raw) / n,
                "class": sum(r[1] / C**2 for r in raw) / n,      # MSE over the C×C entries
                "batch": sum(r[2] / B**2 for r in raw) / n}     # MSE over the B×B entries
    got = multi_level_terms(student, teacher, TEMPS, "authors")
    for level in ("instance", "class", "batch"):
        assert got[level].item() == pytest.approx(expected[level], rel=1e-5), level
    # L = [Σ_T (instance + class + batch)] / 5 / 3 (the authors' KD_methods/MLLD.py)
    assert mlld_loss(student, teacher, TEMPS).item() == pytest.approx(sum(expected.values()), rel=1e-5)


def test_instance_level_is_temperature_scaled_hinton_kd():
    student, teacher = _logits(1)
    got = multi_level_terms(student, teacher, [4.0], "authors")["instance"]
    kd = F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="batchmean") * 16
    assert got.item() == pytest.approx(kd.item() / 3, rel=1e-6)


def test_official_levels_match_explicit_loops():
    student, teacher = _logits(2, b=6, c=5)
    raw, B, C = _loop_levels(student, teacher, TEMPS)
    got = multi_level_terms(student, teacher, TEMPS, "official")
    assert got["instance"].item() == pytest.approx(sum(r[0] for r in raw), rel=1e-5)
    assert got["class"].item() == pytest.approx(sum(r[1] / C for r in raw), rel=1e-5)
    assert got["batch"].item() == pytest.approx(sum(r[2] / B for r in raw), rel=1e-5)


def test_confidence_masks_scale_by_selected_fractions():
    student, teacher = _logits(3, b=7, c=6)
    p = F.softmax(teacher, 1).numpy()
    conf = p.max(1)
    sample_fraction = float(np.mean(conf <= np.percentile(conf, 50)))
    class_conf = p.sum(0)
    class_fraction = float(np.mean(class_conf <= np.percentile(class_conf, 50)))
    got_s, got_c = confidence_fractions(teacher)
    assert got_s.item() == pytest.approx(sample_fraction) and got_c.item() == pytest.approx(class_fraction)
    assert sample_fraction == pytest.approx(4 / 7)  # odd batch: the median sample itself is kept
    plain = multi_level_terms(student, teacher, TEMPS, "official")
    masked = multi_level_terms(student, teacher, TEMPS, "official", confidence_masks=True)
    assert masked["instance"].item() == pytest.approx(plain["instance"].item() * sample_fraction, rel=1e-6)
    assert masked["class"].item() == pytest.approx(plain["class"].item() * class_fraction, rel=1e-6)
    assert masked["batch"].item() == pytest.approx(plain["batch"].item() * sample_fraction, rel=1e-6)


def test_loss_is_zero_for_identical_logits_and_teacher_is_detached():
    student = torch.randn(6, 10, requires_grad=True)
    teacher = student.detach().clone().requires_grad_(True)
    assert mlld_loss(student, teacher, TEMPS).item() == pytest.approx(0.0, abs=1e-6)
    mlld_loss(student * 2, teacher, TEMPS, "official", True).backward()
    assert teacher.grad is None and student.grad is not None


def test_params_block_parses():
    p = method_block("mlld")  # the real params.yaml block: the authors' MLLD
    assert isinstance(p, MLLDParams)
    assert p.teachers == ["mm", "cm"] and p.temperatures == TEMPS
    assert p.normalisation == "authors" and p.confidence_masks is False
    assert p.alpha == AlphaParams(0.5, "authors_step", 30, 0.5)
    raw = raw_params()["mlld"]
    with pytest.raises(ParamsError, match=r"mlld\.normalisation"):
        parse(MLLDParams, {**raw, "normalisation": "bogus"}, "mlld", "test")
    with pytest.raises(ParamsError, match=r"mlld\.temperatures"):
        parse(MLLDParams, {**raw, "temperatures": []}, "mlld", "test")


def _setup(data, config, target, cache=True, **overrides):
    return method_setup("mlld", config, target, data, cache=cache, block=method_block("mlld", **overrides))


def _context(data, split):
    return run_context(data, split, epochs=2, batch_size=16, lr=1e-3)


@pytest.mark.parametrize("config", ["mm", "cm"])
@pytest.mark.parametrize("target", ["m1", "m2"])
def test_method_trains_with_official_switches_and_teacher_stays_frozen(config, target):
    """The official normalisation and confidence masks train every pair (the authors' default: the
    method contract test)."""
    data, split = synthetic_dataset(), synthetic_split()
    method = MultiLevelLogitDistillation.from_setup(_setup(data, config, target, normalisation="official",
                                                           confidence_masks=True))
    assert (method.normalisation, method.confidence_masks) == ("official", True)
    method.prepare(_context(data, split))
    optimizer = method.configure_optimizer(1e-3)
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    student_before = copy.deepcopy(method.student.state_dict())
    method.train()
    for step in range(2):
        terms = method.loss_terms(data.batch(split["train"][16 * step:16 * (step + 1)]), 0)
        assert set(terms) == {"ce", "mlld_instance", "mlld_class", "mlld_batch"}
        loss = torch.stack(list(terms.values())).sum()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not method.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in method.teacher.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in method.student.state_dict().items())


def test_terms_are_alpha_weighted_and_cache_equals_recompute():
    data, split = synthetic_dataset(), synthetic_split()
    batch = data.batch(split["train"][:16])
    values = []
    for cache in (True, False):
        method = MultiLevelLogitDistillation.from_setup(_setup(data, "mm", "m2", cache=cache))
        method.prepare(_context(data, split))
        values.append({k: v.item() for k, v in method.loss_terms(batch, 30).items()})
    cached, fresh = values
    assert cached == pytest.approx(fresh, rel=1e-5, abs=1e-7)
    logits, teacher = method.student(batch), method.teacher(batch)
    assert cached["ce"] == pytest.approx(0.75 * F.cross_entropy(logits, batch["y"]).item(), rel=1e-5)
    level_sum = cached["mlld_instance"] + cached["mlld_class"] + cached["mlld_batch"]
    assert level_sum == pytest.approx(0.25 * mlld_loss(logits, teacher, TEMPS).item(), rel=1e-5)
    assert method.epoch_values(30) == {"alpha": 0.25}


def test_unsupported_teacher_config_and_normalisation_are_rejected():
    with pytest.raises(ValueError, match="mm\\+cm"):
        check_teacher_config(MultiLevelLogitDistillation, "mm+cm")
    check_teacher_config(MultiLevelLogitDistillation, "mm")
    check_teacher_config(MultiLevelLogitDistillation, "cm")
    with pytest.raises(ValueError, match="normalisation"):
        multi_level_terms(*_logits(), TEMPS, "bogus")
    with pytest.raises(ValueError, match="normalisation"):
        MultiLevelLogitDistillation.from_setup(_setup(synthetic_dataset(), "mm", "m1", normalisation="bogus"))
