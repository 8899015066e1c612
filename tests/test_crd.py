"""CRD: the NCE loss against its formula on a fixed memory, negatives, the momentum update, Z, the method
built for every architecture pair with its trained parts, cached teacher features, taps, memory bound and
params (frozen teacher unchanged and cache == recompute for every pair: tests/test_method_contract.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import check_teacher_config
from pipeline.methods.common.tapped_features import FeatureTap, PairTaps
from pipeline.methods.crd import (
    ContrastiveRepresentationDistillation,
    ContrastMemory,
    CRDParams,
    NegativeSampler,
    nce_loss,
)
from pipeline.params import ParamsError, parse
from pipeline.training.engine import train
from tests.conftest import (method_block, method_setup, raw_params, run_context, synthetic_dataset, synthetic_split,
                            with_tap)



def _params(**changes) -> CRDParams:
    """The real params.yaml block of CRD (shrunk), with `changes`."""
    return method_block("crd", **changes)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _memory(n=12, classes=3, k=5, feat_dim=4, seed=0):
    labels = torch.arange(n) % classes
    memory = ContrastMemory(feat_dim, k, temperature=0.5, momentum=0.5)
    memory.reset(labels, classes, torch.Generator().manual_seed(seed))
    return memory, labels


def _nce_by_formula(scores: list[list[float]], n_data: int) -> float:
    """RepDistiller's ContrastLoss written out: scores rows are [P_pos, P_neg1, ..., P_negK]."""
    total = 0.0
    for row in scores:
        m = len(row) - 1
        total += math.log(row[0] / (row[0] + m / n_data + 1e-7))
        total += sum(math.log((m / n_data) / (p + m / n_data + 1e-7)) for p in row[1:])
    return -total / len(scores)


def test_nce_loss_matches_its_formula():
    gen = torch.Generator().manual_seed(0)
    n_data, z = 7, 3.5
    logits = torch.randn(2, n_data, generator=gen, dtype=torch.float64) * 2
    positive = torch.tensor([1, 4])
    negatives = [[0, 2, 2, 6], [5, 0, 0, 0]]  # repeats count once per draw
    counts = torch.zeros(2, n_data, dtype=torch.float64)
    for b, row in enumerate(negatives):
        for j in row:
            counts[b, j] += 1
    p = (logits.exp() / z).tolist()
    scores = [[p[b][positive[b]]] + [p[b][j] for j in negatives[b]] for b in range(2)]
    got = nce_loss(logits, positive, counts, torch.tensor(math.log(z), dtype=torch.float64), n_data, 4)
    assert got.item() == pytest.approx(_nce_by_formula(scores, n_data), rel=1e-12)


def test_contrast_memory_scores_on_a_fixed_memory_match_explicit_formula():
    memory, labels = _memory()
    gen = torch.Generator().manual_seed(1)
    bank_s, bank_t = _unit(torch.randn(12, 4, generator=gen)), _unit(torch.randn(12, 4, generator=gen))
    memory.banks = torch.stack([bank_t, bank_s])
    e_s, e_t = _unit(torch.randn(3, 4, generator=gen)), _unit(torch.randn(3, 4, generator=gen))
    rows = torch.tensor([4, 0, 8])
    state = memory.sampler.generator.get_state()
    negatives = memory.sampler(labels[rows])
    memory.sampler.generator.set_state(state)  # the memory draws the same negatives again
    loss = memory(e_s, e_t, rows, labels[rows])
    index = torch.cat([rows[:, None], negatives], 1)
    raw_s = torch.stack([torch.exp(bank_t[index[b]] @ e_s[b] / 0.5) for b in range(3)])  # student anchor
    raw_t = torch.stack([torch.exp(bank_s[index[b]] @ e_t[b] / 0.5) for b in range(3)])  # teacher anchor
    z_s, z_t = raw_s.mean() * 12, raw_t.mean() * 12
    assert torch.allclose(memory.z, torch.stack([z_s, z_t]), rtol=1e-5)  # (assert_close imports slowly)
    expected = _nce_by_formula((raw_s / z_s).tolist(), 12) + _nce_by_formula((raw_t / z_t).tolist(), 12)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_momentum_update_of_positive_rows_with_renormalisation():
    memory, labels = _memory()
    before_s, before_t = memory.bank_student.clone(), memory.bank_teacher.clone()
    e_s, e_t = _unit(torch.randn(2, 4)), _unit(torch.randn(2, 4))
    rows = torch.tensor([3, 7])
    memory(e_s, e_t, rows, labels[rows])
    for bank, before, current in ((memory.bank_student, before_s, e_s), (memory.bank_teacher, before_t, e_t)):
        assert bank.shape == (12, 4)
        for i, r in enumerate(rows.tolist()):
            mixed = 0.5 * before[r] + 0.5 * current[i]
            assert torch.allclose(bank[r], mixed / mixed.norm(), rtol=1e-5, atol=1e-7)
        untouched = [r for r in range(12) if r not in rows.tolist()]
        assert torch.equal(bank[untouched], before[untouched])


def test_banks_start_uniform_in_the_authors_range():
    memory, _ = _memory(n=500, feat_dim=128)
    stdv = 1 / math.sqrt(128 / 3)
    for bank in (memory.bank_student, memory.bank_teacher):
        assert bank.shape == (500, 128) and bank.abs().max() <= stdv and bank.abs().max() > 0.9 * stdv
    assert not torch.equal(memory.bank_student, memory.bank_teacher)


def test_z_is_set_on_the_first_batch_and_then_fixed():
    memory, labels = _memory()
    rows = torch.tensor([0, 1, 2])
    memory(_unit(torch.randn(3, 4)), _unit(torch.randn(3, 4)), rows, labels[rows])
    z = memory.z.clone()
    assert (z > 0).all()
    memory(_unit(torch.randn(3, 4)) * -1, _unit(torch.randn(3, 4)), rows, labels[rows])
    assert torch.equal(memory.z, z)


@pytest.mark.parametrize("k", [12, 40])
def test_negatives_come_from_other_classes_without_replacement_when_enough_exist(k):
    # class 0 sees 10 other-class samples, classes 1 and 2 see 35 (K = 12: "mixed"; K = 40: all replace)
    labels = torch.tensor([0] * 30 + [1] * 5 + [2] * 5)
    sampler = NegativeSampler(labels, 3, k=k, generator=torch.Generator().manual_seed(0))
    query = torch.tensor([0, 1, 2, 1, 0] * 40)
    negatives = sampler(query)
    assert negatives.shape == (200, k)
    assert (labels[negatives] != query[:, None]).all()
    for row, c in zip(negatives.tolist(), query.tolist(), strict=True):
        pool = 10 if c == 0 else 35
        if pool >= k:
            assert len(set(row)) == k  # enough candidates: all distinct
        else:
            assert len(set(row)) <= pool  # fewer than K candidates: drawn with replacement
    seen = sampler(torch.tensor([1] * 300)).flatten().bincount(minlength=40)
    assert (seen[:30] > 0).all() and (seen[30:35] == 0).all() and (seen[35:] > 0).all()
    again = NegativeSampler(labels, 3, k=k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(query), negatives)  # a seeded generator makes the draws reproducible
    state = again.generator.get_state()
    rows = again(query)
    again.generator.set_state(state)
    counts = again.counts(query, 40)  # the same draws, as per-row counts
    assert torch.equal(counts, torch.stack([r.bincount(minlength=40) for r in rows]).float())


def test_negatives_without_replacement_are_uniform_subsets():
    labels = torch.tensor([0] * 6 + [1] * 2)
    sampler = NegativeSampler(labels, 2, k=3, generator=torch.Generator().manual_seed(0))
    assert sampler.mode == "mixed"  # class 1 (6 candidates) without, class 0 (2 candidates) with replacement
    draws = sampler(torch.ones(6000, dtype=torch.long))
    subsets = torch.sort(draws, dim=1).values
    codes = (subsets * torch.tensor([64, 8, 1])).sum(1).unique(return_counts=True)[1]
    assert len(codes) == 20  # all C(6, 3) subsets occur, about equally often
    assert codes.min() > 6000 / 20 * 0.75 and codes.max() < 6000 / 20 * 1.25


def _method(config="mm", target="m2", params=None, cache=True):
    data = synthetic_dataset()
    setup = method_setup("crd", config, target, data, block=params or _params(), cache=cache)
    return ContrastiveRepresentationDistillation.from_setup(setup), data


def _context(data, batch_size=16):
    return run_context(data, synthetic_split(), epochs=2, batch_size=batch_size, lr=1e-2)


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
    method, data = _method(config, target, _params(nce_k={"av_digits": 64}))
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    before = {name: copy.deepcopy(m.state_dict()) for name, m in
              (("student", method.student), ("embed_student", method.embed_student),
               ("embed_teacher", method.embed_teacher))}
    terms = _steps(method, data)
    assert set(terms) == {"ce", "crd"} and all(torch.isfinite(v) for v in terms.values())
    assert not method.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in method.teacher.state_dict().items())
    for name, module in (("student", method.student), ("embed_student", method.embed_student),
                         ("embed_teacher", method.embed_teacher)):  # the teacher embedding is trained too
        assert any(not torch.equal(before[name][k], v) for k, v in module.state_dict().items()), name
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable == {id(p) for m in (method.student, method.embed_student, method.embed_teacher)
                         for p in m.parameters()}


def test_embedding_widths_follow_the_taps():
    method, _ = _method("mm", "m2")
    assert method.embed_student.linear.in_features == 128 * 2 * 2  # conv3 128×4×4, max-pooled 2×2
    assert method.embed_teacher.linear.in_features == 298           # CNN-I fc1
    method, _ = _method("cm", "m1")
    assert (method.embed_student.linear.in_features, method.embed_teacher.linear.in_features) == (84, 512)
    assert method.memory.k == 4096


def test_loss_terms_are_weighted_by_alpha_or_the_original_weights():
    method, data = _method("cm", "m2")
    method.prepare(_context(data))
    batch = data.batch(synthetic_split()["train"][:12])
    generator_state = method.memory.sampler.generator.get_state()
    terms = method.loss_terms(batch, epoch=30)  # α = 0.25
    logits = method.student(batch)
    assert terms["ce"].item() == pytest.approx(0.75 * F.cross_entropy(logits, batch["y"]).item(), rel=1e-5)
    # the same CRD value from a memory in the same state (same banks, same negatives)
    method.prepare(_context(data))
    method.memory.sampler.generator.set_state(generator_state)
    e_s = method.embed_student(method.student_tapped(batch)[1])
    e_t = method.embed_teacher(method.teacher_tapped(batch)[1])
    crd = method.memory(e_s, e_t, method._row_of[batch["index"]], batch["y"])
    assert terms["crd"].item() == pytest.approx(0.25 * crd.item(), rel=1e-5)
    assert method.epoch_values(30) == {"alpha": 0.25}
    original, _ = _method("cm", "m2", _params(loss_form="original", nce_k={"av_digits": 16384}))
    original.prepare(_context(data))
    terms = original.loss_terms(batch, epoch=30)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(original.student(batch), batch["y"]).item(), rel=1e-5)
    assert original.epoch_values(0) == {}


def test_cached_teacher_features_give_the_same_loss_as_recomputed():
    results = []
    for cache in (True, False):
        method, data = _method("mm", "m2", cache=cache)
        torch.manual_seed(1)
        results.append({k: v.item() for k, v in _steps(method, data).items()})
        assert method.teacher_features.enabled == cache
    for key in results[0]:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-7), key
    small_cache, data = _method("mm", "m2", _params(cache_max_mb=0.0))
    small_cache.prepare(_context(data))
    assert not small_cache.teacher_features.enabled  # the table does not fit: the teacher is re-run


def test_memory_bound_and_bad_taps_are_clear_errors():
    method, data = _method("mm", "m1", _params(max_memory_mb=1.0))
    with pytest.raises(ValueError, match=r"crd\.max_memory_mb is 1, but the contrast memory needs"):
        method.prepare(_context(data))
    with pytest.raises(RuntimeError, match="prepare"):
        _method("mm", "m1")[0].loss_terms(data.batch(torch.arange(4)), 0)
    pair = _params().taps["cnn_i"]["lenet5"]
    # a module the architecture does not have: a KeyError naming it when it reaches the method ...
    with pytest.raises(KeyError, match="no module named 'conv9'"):
        _method("mm", "m1", _params(taps={"cnn_i": {"lenet5": with_tap(pair, "student", module="conv9")}}))
    # ... and rejected when params.yaml is parsed, naming the key
    raw = raw_params()["crd"]
    raw["taps"]["cnn_i"]["lenet5"]["student"]["module"] = "conv9"
    with pytest.raises(ParamsError, match=r"crd\.taps\.cnn_i\.lenet5: 'conv9' is not a module of lenet5"):
        parse(CRDParams, raw, "crd", "test")
    with pytest.raises(KeyError, match=r"crd\.taps\.lenet5\.three_layer_cnn_a is missing"):
        _method("cm", "m2", _params(taps={"cnn_i": {"lenet5": pair}}))
    with pytest.raises(KeyError, match=r"crd\.nce_k\.av_digits is missing"):
        _method("mm", "m1", _params(nce_k={"av_mnist": 4096}))
    with pytest.raises(ValueError, match=r"crd\.taps\.cnn_i\.lenet5\.teacher\.pool"):
        _method("mm", "m1", _params(taps={"cnn_i": {"lenet5": with_tap(pair, "teacher", pool=2)}}))
    check_teacher_config(ContrastiveRepresentationDistillation, "mm")
    check_teacher_config(ContrastiveRepresentationDistillation, "cm")
    with pytest.raises(ValueError, match="does not support teacher config 'mm\\+cm'"):
        check_teacher_config(ContrastiveRepresentationDistillation, "mm+cm")


def test_params_block_parses():
    params = _params()
    assert params.teachers == ["mm", "cm"]
    assert params.nce_k == {key: 4096 for key in ("av_digits", "av_mnist", "ravdess", "vggsound50k", "crisismmd_v2")}
    assert (params.feat_dim, params.nce_t, params.momentum, params.original_weight) == (128, 0.07, 0.5, 0.8)
    assert (params.loss_form, params.max_memory_mb, params.cache_max_mb) == ("authors", 4096.0, 1024.0)
    assert params.taps["three_layer_cnn_a"]["lenet5"] == PairTaps(FeatureTap("conv3", 2), FeatureTap("fc1", 0))
    assert params.taps["cnn_i"]["three_layer_cnn_a"].student == FeatureTap("conv3", 2)
    assert params.alpha == AlphaParams(0.5, "authors_step", 30, 0.5)
    with pytest.raises(ParamsError, match=r"crd\.nce_k"):
        parse(CRDParams, {**raw_params()["crd"], "nce_k": {"av_digits": 0}}, "crd", "test")


def test_trains_through_the_engine_reproducibly():
    """Two engine runs from the same seed give identical histories (seeded memory and negatives)."""
    histories = []
    for _ in range(2):
        torch.manual_seed(3)
        method, data = _method("cm", "m1")
        result = train(method, run_context(data, synthetic_split(), epochs=2, batch_size=16, lr=1e-2))
        assert [p.name for p in result.phases] == ["main"]
        histories.append(result.final.history)
    assert len(histories[0]) == 2
    assert histories[0] == histories[1]
    assert all(math.isfinite(h["train_crd"]) for h in histories[0])
