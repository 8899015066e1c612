"""MST-Distill building blocks: MaskNet sizes against the authors' (spec §4.5), shapes, and the losses
against hand-computed values; its three phases, and the registered method `mst` built as the pipeline builds it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.methods import method_class
from pipeline.methods.common.kl import softened_kl
from pipeline.methods.mst.gate_net import GateNet
from pipeline.methods.mst.losses import bidirectional_alignment, load_balancing_loss, topk_distillation
from pipeline.methods.mst.mask_net import MaskNet1d, MaskNet2d, apply_mask, hidden_width, mask_net_for
from pipeline.methods.mst.collaborative_init import collaborative_init_phase
from pipeline.methods.mst.dynamic_distillation import DynamicDistillation, LossWeights
from pipeline.methods.mst.method import MSTDistill, specialists_of
from pipeline.methods.mst.specialist_adaptation import (SpecialistMasks, build_group, masked_logits, resolve_modules,
                                                        specialist_phase)
from pipeline.orchestration.config import parse_params
from pipeline.params import ParamsError
from pipeline.training.engine import run_phase, train
from pipeline.training.phases import Phase
from tests.conftest import (method_block, method_setup, role_network, run_context, shrunk_params, shrunk_raw,
                            synthetic_dataset, synthetic_split)


def _count_on_meta(feature_shape, factor=2.0, heads=3) -> int:
    with torch.device("meta"):  # no memory for the 100M-parameter ones
        return sum(p.numel() for p in mask_net_for(feature_shape, factor, heads).parameters())


@pytest.mark.parametrize("shape, expected", [
    ((596,), 106_030_486), ((298,), 13_185_166), ((64, 56, 56), 133_351), ((128, 28, 28), 1_074_240),
    ((120, 1, 1), 885_901), ((84,), 307_147), ((320,), 16_434_400), ((160,), 2_034_007), ((512,), 67_238_656),
    ((256,), 8_353_927), ((1024,), 536_338_951), ((512, 30, 40), 67_506_432)])
def test_mask_net_parameter_counts_match_the_authors(shape, expected):
    assert _count_on_meta(shape) == expected


def test_hidden_width_rule_and_its_floor():
    assert hidden_width(596, 2, 3) == 297 and hidden_width(64, 2, 3) == 30
    assert hidden_width(64, 32, 3) == 3  # the formula gives 0 here; one width per head is the floor


def test_mask_values_are_in_unit_interval_and_applied_per_dimension_or_channel():
    torch.manual_seed(0)
    vector = torch.randn(5, 12)
    mask_1d = MaskNet1d(12, hidden_factor=2, heads=3)
    mask = mask_1d(vector)
    assert mask.shape == (5, 12) and bool(((mask > 0) & (mask < 1)).all())
    torch.testing.assert_close(apply_mask(mask_1d, vector), mask * vector)
    # a (B,C,1,1) conv output goes squeezed through a MaskNet_1d, as the authors', and keeps its shape
    one_by_one = apply_mask(mask_1d, vector[:, :, None, None])
    assert one_by_one.shape == (5, 12, 1, 1)
    torch.testing.assert_close(one_by_one.flatten(1), mask * vector)
    fmap = torch.randn(5, 6, 8, 8)
    mask_2d = MaskNet2d(6, hidden_factor=1, heads=3).eval()
    masked = apply_mask(mask_2d, fmap)
    channel_mask = mask_2d(fmap)
    assert masked.shape == fmap.shape and channel_mask.shape == (5, 6)
    torch.testing.assert_close(masked, fmap * channel_mask[:, :, None, None])


def test_gate_net_sizes_and_output():
    assert sum(p.numel() for p in GateNet(10, 4).parameters()) == 304
    assert sum(p.numel() for p in GateNet(8, 4).parameters()) == 212
    assert sum(p.numel() for p in GateNet(141, 4).parameters()) == 41_176
    probs = GateNet(10, 4)(torch.randn(7, 10))
    assert probs.shape == (7, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(7))


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def _soft(z, T):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def test_bidirectional_alignment_is_symmetric_kl_with_gradients_to_both_sides():
    a = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    b = torch.tensor([[0.0, 2.0, 0.5]], requires_grad=True)
    T = 4.0
    pa, pb = _soft([1.0, 0.0, -1.0], T), _soft([0.0, 2.0, 0.5], T)
    expected = T**2 * (_kl(pa, pb) + _kl(pb, pa))
    loss = bidirectional_alignment([a, b], T)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # three models: six ordered pairs
    c = torch.tensor([[0.3, 0.3, 0.3]])
    pc = _soft([0.3, 0.3, 0.3], T)
    three = bidirectional_alignment([a.detach(), b.detach(), c], T).item()
    assert three == pytest.approx(T**2 * sum(_kl(p, q) for p in (pa, pb, pc) for q in (pa, pb, pc) if p is not q),
                                  rel=1e-5)


def test_detached_alignment_has_the_same_value_but_one_way_gradients():
    a = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, 5)
    joint = bidirectional_alignment([a, b], 4.0)
    detached = bidirectional_alignment([a, b], 4.0, detach_peer=True)
    assert joint.item() == pytest.approx(detached.item(), rel=1e-6)
    (grad_detached,) = torch.autograd.grad(detached, a)
    (grad_only_learner,) = torch.autograd.grad(softened_kl(a, b, 4.0), a)
    torch.testing.assert_close(grad_detached, grad_only_learner)


def test_load_balancing_kl_and_cv_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    by_hand = 0.5 * (math.log(0.5) - math.log(0.6)) + 0.5 * (math.log(0.5) - math.log(0.4))
    assert load_balancing_loss(probs, "kl").item() == pytest.approx(by_hand, rel=1e-5)  # float32
    assert load_balancing_loss(probs, "kl", divide_by_n=True).item() == pytest.approx(by_hand / 2, rel=1e-5)
    assert load_balancing_loss(torch.full((3, 4), 0.25), "kl").item() == pytest.approx(0.0, abs=1e-7)
    # importance = [1.2, 0.8]: unbiased std = sqrt(0.2² + 0.2²) = 0.2828, mean 1.0
    assert load_balancing_loss(probs, "cv").item() == pytest.approx(math.sqrt(0.08), rel=1e-6)
    with pytest.raises(ValueError, match="load-balancing mode"):
        load_balancing_loss(probs, "entropy")


def test_topk_distillation_gathers_each_samples_own_teachers():
    T = 4.0
    student = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    teachers = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]],
                             [[0.0, 3.0], [3.0, 0.0], [0.5, 0.0]]])
    gate = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    loss, chosen = topk_distillation(student, teachers, gate, 1, T)
    assert chosen.tolist() == [[1], [0]]
    ps = [_soft([0.0, 1.0], T), _soft([1.0, 0.0], T)]
    by_hand = T**2 * (_kl(_soft([0.0, 2.0], T), ps[0]) + _kl(_soft([0.0, 3.0], T), ps[1])) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    loss2, chosen2 = topk_distillation(student, teachers, gate, 2, T)
    assert chosen2.tolist() == [[1, 2], [0, 2]]
    second = T**2 * (_kl(_soft([1.0, 1.0], T), ps[0]) + _kl(_soft([0.5, 0.0], T), ps[1])) / 2
    assert loss2.item() == pytest.approx((by_hand + second) / 2, rel=1e-5)
    gate.requires_grad_(True)
    topk_distillation(student, teachers, gate, 1, T)[0].backward()
    assert gate.grad is None  # top-k passes no gradient to the router (quirk Q4)
    with pytest.raises(ValueError, match="1 <= k <= 3"):
        topk_distillation(student, teachers, gate, 4, T)


def test_collaborative_init_trains_all_networks_jointly():
    data, split = synthetic_dataset(), synthetic_split()
    torch.manual_seed(0)
    nets = {role: role_network(role) for role in ("mm", "m1", "m2")}
    before = {role: [p.detach().clone() for p in net.parameters()] for role, net in nets.items()}
    context = run_context(data, split)
    phase = collaborative_init_phase(nets, epochs=2, lr=1e-3, temperature=4.0, detach_peer=False, context=context)
    assert phase.name == "collaborative_init" and phase.score is None  # no selection: the last epoch is kept
    logged = []
    result = run_phase(phase, context, log=lambda name, epoch, metrics: logged.append((name, epoch)))
    assert logged == [("collaborative_init", 0), ("collaborative_init", 1)]
    metrics = result.history[-1]
    assert {"train_ce_mm", "train_ce_m1", "train_ce_m2", "train_alignment", "val_m2_accuracy",
            "val_mm_loss"} <= set(metrics)
    assert metrics["train_alignment"] > 0
    assert metrics["train_loss"] == pytest.approx(
        sum(metrics[k] for k in ("train_ce_mm", "train_ce_m1", "train_ce_m2", "train_alignment")), rel=1e-5)
    assert result.best_epoch == 1
    for role, net in nets.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[role], net.parameters())), role


def _stage2_setup():
    data, split = synthetic_dataset(), synthetic_split()
    torch.manual_seed(0)
    mm, aux, student = role_network("mm"), role_network("m2"), role_network("m1")
    sample = data.batch(torch.arange(2))
    groups = [build_group("mm", mm, ["concat_identity", "fc1"], sample, hidden_factor=32, heads=3),
              build_group("cm", aux, ["conv2", "conv3"], sample, hidden_factor=4, heads=3)]
    return data, split, student, groups


def test_stage2_trains_only_the_masks_and_keeps_frozen_weights_and_buffers():
    data, split, student, groups = _stage2_setup()
    frozen = {name: copy.deepcopy(m.state_dict()) for name, m in (("student", student), ("mm", groups[0].network),
                                                                 ("cm", groups[1].network))}
    masks_before = [copy.deepcopy(g.masks.state_dict()) for g in groups]
    context = run_context(data, split)
    phase = specialist_phase(student, groups, epochs=2, lr=1e-3, temperature=4.0, context=context)
    assert phase.name == "specialist_adaptation"
    result = run_phase(phase, context)
    metrics = result.history[-1]
    assert {"val_kl_mm_fc1", "train_kl_cm_conv2", "val_score", "best_epoch"} <= set(metrics)
    scores = [h["val_score"] for h in result.history]
    assert result.best_epoch == scores.index(min(scores))
    # the score is mean KL per teacher, summed over teachers (one joint choice)
    assert metrics["val_score"] == pytest.approx(
        (metrics["val_kl_mm_concat_identity"] + metrics["val_kl_mm_fc1"]) / 2
        + (metrics["val_kl_cm_conv2"] + metrics["val_kl_cm_conv3"]) / 2, rel=1e-6)
    for name, module in (("student", student), ("mm", groups[0].network), ("cm", groups[1].network)):
        assert all(torch.equal(frozen[name][k], v) for k, v in module.state_dict().items()), name
        assert all(p.grad is None for p in module.parameters()), name
    changed = [not all(torch.equal(before[k], v) for k, v in g.masks.state_dict().items())
               for before, g in zip(masks_before, groups)]
    assert changed == [True, True]
    assert all(not m.training for g in groups for m in g.masks)
    # the masks hold the selected epoch's weights
    states = result.best_states
    assert len(states) == 2
    for state, g in zip(states, groups):
        assert all(torch.equal(state[k], v) for k, v in g.masks.state_dict().items())


def test_masked_forward_changes_logits_and_hooks_are_removed():
    data, _, _, groups = _stage2_setup()
    batch = data.batch(torch.arange(4))
    group = groups[0]
    with torch.no_grad():
        plain = group.network(batch)
        one, both = masked_logits(group, batch, [0]), masked_logits(group, batch, [0, 1])
        again = group.network(batch)
    assert not torch.allclose(plain, one) and not torch.allclose(one, both)
    torch.testing.assert_close(plain, again)
    assert all(not m._forward_hooks for m in group.network.modules())


def test_unknown_hook_name_is_a_clear_error():
    data, _, _, groups = _stage2_setup()
    with pytest.raises(KeyError, match="'conv9' is not a module of ThreeLayerCNN-A"):
        build_group("cm", groups[1].network, ["conv9"], data.batch(torch.arange(2)), 4, 3)
    with pytest.raises(KeyError, match="'fc9' is not a module of CNN-I"):
        resolve_modules(groups[0].network, ["fc1", "fc9"])
    assert resolve_modules(groups[0].network, ["fc1"]) == [groups[0].network.body.fc1]
    # in params.yaml, a hooked module that does not exist is rejected when the block is parsed
    raw = shrunk_raw()
    raw["mst"]["hooks"]["three_layer_cnn_a"] = ["conv2", "conv9"]
    with pytest.raises(ParamsError, match=r"mst\.hooks\.three_layer_cnn_a.*conv9"):
        parse_params(raw)
    # and a teacher architecture without hooks stops the run before training
    hooks = {"cnn_i": ["concat_identity", "fc1"]}
    restored = {"networks": {role: role_network(role) for role in ("mm", "m1", "m2")}}
    with pytest.raises(KeyError, match=r"mst\.hooks\.three_layer_cnn_a is missing"):
        MSTDistill.from_setup(method_setup("mst", "mm+cm", "m1", block=method_block("mst", hooks=hooks),
                                           phase="specialist_adaptation", student=None, restored=restored))


def test_loss_weight_schedules_paper_and_authors():
    paper, authors = LossWeights(1.0, 1.0), LossWeights(1.0, 1.0, decay_after_epoch0=True)
    assert [paper.at(e)[0] for e in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    assert [authors.at(e)[0] for e in (0, 1, 30, 31)] == [1.0, 0.5, 0.5, 0.25]
    assert paper.at(10)[1] == pytest.approx(0.9) and authors.at(1)[1] == pytest.approx(0.9)
    assert authors.at(11)[1] == pytest.approx(0.81) and paper.at(11)[1] == pytest.approx(0.9)


def _objective(groups, cache: bool, topk: int = 1, lb_mode: str = "kl") -> DynamicDistillation:
    torch.manual_seed(5)  # the same GateNet for every objective
    return DynamicDistillation(specialists_of(groups, stacked_hooks=False), (10,), topk=topk, temperature=4.0,
                               lb_mode=lb_mode, lb_divide_by_n=False, weights=LossWeights(), cache=cache)


def test_stage3_with_cached_specialists_equals_recomputing_them():
    data, split, student, groups = _stage2_setup()
    for group in groups:
        group.masks.eval()
    context = run_context(data, split)
    objectives = {cache: _objective(groups, cache) for cache in (True, False)}
    for objective in objectives.values():
        objective.prepare(context)
    student.eval()
    for epoch in (0, 1):
        for batch in context.batches("train", shuffle=True):
            with torch.no_grad():
                logits = student(batch)
            terms, grads = {}, {}
            for cache, objective in objectives.items():
                fed = logits.clone().requires_grad_(True)
                terms[cache] = objective.terms(fed, batch, epoch)
                grads[cache] = torch.autograd.grad(sum(terms[cache].values()), [fed, *objective.gate.parameters()])
            assert terms[True].keys() == terms[False].keys() == {"ce", "kd", "lb"}
            for key in terms[True]:
                assert terms[True][key].item() == pytest.approx(terms[False][key].item(), rel=1e-5, abs=1e-6), key
            for a, b in zip(grads[True], grads[False]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        values = {cache: objective.epoch_values(epoch) for cache, objective in objectives.items()}
        assert values[True] == pytest.approx(values[False])
        assert {"route_0", "route_3", "lambda_kd", "lambda_lb"} <= set(values[True])
        assert sum(values[True][f"route_{i}"] for i in range(4)) == pytest.approx(1.0)


def _train_stage3(data, split, student, groups, cache: bool):
    objective = _objective(groups, cache)
    student = copy.deepcopy(student)
    context = run_context(data, split)
    phase = Phase("dynamic_distillation", 2, lambda batch, epoch: objective.terms(student(batch), batch, epoch),
                  lambda: torch.optim.Adam([*student.parameters(), *objective.parameters()], lr=1e-3),
                  train_modules=[student, objective],
                  validate=lambda epoch: context.evaluate(student, "val").as_dict("val"),
                  before=lambda: objective.prepare(context), epoch_values=objective.epoch_values)
    return run_phase(phase, context).history


def test_stage3_training_with_cached_specialists_equals_recomputing_them():
    torch.set_num_threads(1)
    data, split, student, groups = _stage2_setup()
    for group in groups:
        group.masks.eval()
    cached, recomputed = (_train_stage3(data, split, student, groups, cache) for cache in (True, False))
    for a, b in zip(cached, recomputed, strict=True):
        assert a.keys() == b.keys() and {"route_0", "route_3", "lambda_kd", "train_lb", "train_kd"} <= set(a)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        assert sum(a[f"route_{i}"] for i in range(4)) == pytest.approx(1.0)


def test_stage3_bad_settings_fail_before_training():
    _, _, _, groups = _stage2_setup()
    with pytest.raises(ValueError, match="topk = 5 but there are 4"):
        _objective(groups, True, topk=5)
    with pytest.raises(ValueError, match="topk = 0 but there are 4"):
        _objective(groups, True, topk=0)
    with pytest.raises(ValueError, match="load-balancing mode"):
        _objective(groups, True, lb_mode="l2")
    # params.yaml: a top-level topk beyond the N = 2 x 2 specialised teachers is rejected when parsed
    with pytest.raises(ParamsError, match="topk.*exceeds the 4 specialised teachers"):
        shrunk_params(topk=5)
    with pytest.raises(ParamsError, match="topk"):
        shrunk_params(topk=0)
    params = shrunk_params(topk=4)  # phase 3's runs fill the top-level topk into the block
    assert params.method("mst").with_topk(params.topk).topk == 4
    # an unknown phase or Table 3 setting stops the build
    restored = {"networks": {role: role_network(role) for role in ("mm", "m1", "m2")}}
    with pytest.raises(ValueError, match="unknown MST-Distill phase 'stage4'"):
        MSTDistill.from_setup(method_setup("mst", "mm+cm", "m1", phase="stage4", student=None, restored=restored))
    with pytest.raises(ValueError, match="unknown MST-Distill setting 'g'"):
        MSTDistill.from_setup(method_setup("mst", "mm+cm", "m1", phase="dynamic_distillation", setting="g",
                                           student=None, restored=restored))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("target", ["m1", "m2"])
def test_mst_method_through_its_three_phases(target):
    """What each phase's run evaluates and checkpoints, and phase 3's routing record, as the pipeline builds them."""
    torch.set_num_threads(1)
    data, split = synthetic_dataset(), synthetic_split()
    cls = method_class("mst")
    assert cls is MSTDistill
    other = {"m1": "m2", "m2": "m1"}[target]
    block = method_block("mst")

    # 1. collaborative initialisation: all three networks trained, evaluated and saved
    first = cls.from_setup(method_setup("mst", "mm+cm", target, data, phase="collaborative_init", student=None))
    assert set(first.evaluated_networks()) == set(first.checkpoints()) == {"mm", "m1", "m2"}
    result = train(first, run_context(data, split))
    assert [(p.name, p.epochs) for p in result.phases] == [("collaborative_init", 2)]
    assert result.final.best_epoch == 1  # no selection
    assert set(result.test) == set(result.test_last) == {"mm", "m1", "m2"}
    networks = first.checkpoints()
    assert first.run_extras(result) == {}

    # 2. specialist adaptation: only the MaskNets, checkpointed; nothing evaluated on test
    second = cls.from_setup(method_setup("mst", "mm+cm", target, data, phase="specialist_adaptation", student=None,
                                         restored={"networks": copy.deepcopy(networks)}))
    assert second.evaluated_networks() == {}
    (name, masks), = second.checkpoints().items()
    assert name == "masks" and isinstance(masks, SpecialistMasks)
    other_arch = networks[other].arch
    assert masks.checkpoint_meta == {"mm": block.hooks["cnn_i"][:2], "cm": block.hooks[other_arch][:2]}
    frozen = copy.deepcopy(second.student.state_dict())
    assert _same(frozen, networks[target].state_dict())
    result = train(second, run_context(data, split))
    assert [(p.name, p.epochs) for p in result.phases] == [("specialist_adaptation", 1)]
    assert result.test == {} and result.test_last == {}
    assert second.run_extras(result) == {"val_score": result.final.best_metrics["val_score"]}
    assert _same(frozen, second.student.state_dict())

    # 3. dynamic distillation: the student (phase 1's network) evaluated, nothing saved, the routing recorded
    restored = {"networks": copy.deepcopy(networks), "masks": masks}
    third = cls.from_setup(method_setup("mst", "mm+cm", target, data, phase="dynamic_distillation", setting="full",
                                        student=None, restored=restored))
    assert third.student is restored["networks"][target]
    assert set(third.evaluated_networks()) == {"student"} and third.checkpoints() == {}
    assert _same(third.masks.state_dict(), masks.state_dict())
    result = train(third, run_context(data, split))
    assert [(p.name, p.epochs) for p in result.phases] == [("dynamic_distillation", 2)]
    assert set(result.test) == {"student"}
    assert not _same(third.student.state_dict(), networks[target].state_dict())  # the student trained
    extras = third.run_extras(result)
    assert (extras["S1"], extras["S2"], extras["S3"], extras["topk"]) == (True, True, True, 1)
    assert extras["specialists"] == [f"mm:{layer}" for layer in block.hooks["cnn_i"][:2]] + [
        f"cm:{layer}" for layer in block.hooks[other_arch][:2]]
    assert extras["specialists"][:2] == ["mm:concat_identity", "mm:fc1"]
    routing = extras["routing"]
    assert len(routing) == 2 and all(len(epoch) == 4 for epoch in routing)
    assert routing == [[h[f"route_{i}"] for i in range(4)] for h in result.final.history]
    assert all(sum(epoch) == pytest.approx(1.0) for epoch in routing)


@pytest.mark.parametrize("setting, specialists", [("c", ["mm", "cm"]), ("baseline", None)])
def test_mst_phase3_settings_without_masks(setting, specialists):
    """Table 3 settings without S2 route over (or average) the plain teachers; without S3 nothing is routed."""
    torch.set_num_threads(1)
    data, split = synthetic_dataset(), synthetic_split()
    restored = {"networks": {role: role_network(role) for role in ("mm", "m1", "m2")}}
    method = MSTDistill.from_setup(method_setup("mst", "mm+cm", "m1", data, phase="dynamic_distillation",
                                                setting=setting, student=None, restored=restored))
    assert set(method.evaluated_networks()) == {"student"} and method.checkpoints() == {}
    result = train(method, run_context(data, split, epochs=1))
    extras = method.run_extras(result)
    assert extras["S2"] is False and extras["S3"] is (specialists is not None)
    if specialists is None:
        assert extras["topk"] is None and "routing" not in extras and "specialists" not in extras
        assert "train_lb" not in result.final.history[0]
    else:
        assert extras["specialists"] == specialists
        assert len(extras["routing"]) == 1 and len(extras["routing"][0]) == 2
