"""MST-Distill building blocks: MaskNet sizes against the authors' (spec §4.5), shapes, and the losses
against hand-computed values."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.methods.kd import softened_kl
from pipeline.methods.mst.gate_net import GateNet
from pipeline.methods.mst.losses import bidirectional_alignment, load_balancing_loss, topk_distillation
from pipeline.methods.mst.mask_net import MaskNet1d, MaskNet2d, apply_mask, hidden_width, mask_net_for


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
    squeezed = apply_mask(mask_1d, vector[:, :, None, None])   # a (B,C,1,1) conv output is squeezed, as the authors
    assert squeezed.shape == (5, 12)
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
    from pipeline.methods.mst.collaborative_init import collaborative_init
    from pipeline.models.registry import build_network
    from tests.conftest import synthetic_dataset, synthetic_split

    data, split = synthetic_dataset(), synthetic_split()
    torch.manual_seed(0)
    nets = {"mm": build_network("cnn_i", ["m1", "m2"], 10, [(1, 28, 28), (1, 16, 16)]),
            "m1": build_network("lenet5", ["m1"], 10, [(1, 28, 28)]),
            "m2": build_network("three_layer_cnn_a", ["m2"], 10, [(1, 16, 16)])}
    before = {role: [p.detach().clone() for p in net.parameters()] for role, net in nets.items()}
    logged = []
    metrics = collaborative_init(nets, data, split, epochs=2, batch_size=16, lr=1e-3, temperature=4.0,
                                 detach_peer=False, num_classes=10, generator=torch.Generator().manual_seed(0),
                                 on_epoch=lambda e, m: logged.append(e))
    assert logged == [0, 1]
    assert {"train_ce_mm", "train_ce_m1", "train_ce_m2", "train_alignment", "val_m2_accuracy"} <= set(metrics)
    assert metrics["train_alignment"] > 0
    for role, net in nets.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[role], net.parameters())), role


def _stage2_setup():
    from pipeline.methods.mst.specialist_adaptation import build_group
    from pipeline.models.registry import build_network
    from tests.conftest import synthetic_dataset, synthetic_split

    data, split = synthetic_dataset(), synthetic_split()
    torch.manual_seed(0)
    mm = build_network("cnn_i", ["m1", "m2"], 10, [(1, 28, 28), (1, 16, 16)])
    aux = build_network("three_layer_cnn_a", ["m2"], 10, [(1, 16, 16)])
    student = build_network("lenet5", ["m1"], 10, [(1, 28, 28)])
    sample = data.batch(torch.arange(2))
    groups = [build_group("mm", mm, ["concat_identity", "fc1"], sample, hidden_factor=32, heads=3),
              build_group("cm", aux, ["conv2", "conv3"], sample, hidden_factor=4, heads=3)]
    return data, split, student, groups


def test_stage2_trains_only_the_masks_and_keeps_frozen_weights_and_buffers():
    from pipeline.methods.mst.specialist_adaptation import specialist_adaptation

    data, split, student, groups = _stage2_setup()
    frozen = {name: copy.deepcopy(m.state_dict()) for name, m in (("student", student), ("mm", groups[0].network),
                                                                 ("cm", groups[1].network))}
    masks_before = [copy.deepcopy(g.masks.state_dict()) for g in groups]
    metrics = specialist_adaptation(student, groups, data, split, epochs=2, batch_size=16, lr=1e-3, temperature=4.0,
                                    generator=torch.Generator().manual_seed(0))
    assert {"val_kl_mm_fc1", "train_kl_cm_conv2", "val_score", "best_epoch"} <= set(metrics)
    for name, module in (("student", student), ("mm", groups[0].network), ("cm", groups[1].network)):
        assert all(torch.equal(frozen[name][k], v) for k, v in module.state_dict().items()), name
        assert all(p.grad is None for p in module.parameters()), name
    changed = [not all(torch.equal(before[k], v) for k, v in g.masks.state_dict().items())
               for before, g in zip(masks_before, groups)]
    assert changed == [True, True]
    assert all(not m.training for g in groups for m in g.masks)


def test_masked_forward_changes_logits_and_hooks_are_removed():
    from pipeline.methods.mst.specialist_adaptation import masked_logits

    data, _, _, groups = _stage2_setup()
    batch = data.batch(torch.arange(4))
    group = groups[0]
    with torch.no_grad():
        plain = group.network(batch)
        one, both = masked_logits(group, batch, [0]), masked_logits(group, batch, [0, 1])
        again = group.network(batch)
    assert not torch.allclose(plain, one) and not torch.allclose(one, both)
    torch.testing.assert_close(plain, again)


def test_unknown_hook_name_is_a_clear_error():
    from pipeline.methods.mst.specialist_adaptation import build_group

    data, _, _, groups = _stage2_setup()
    with pytest.raises(KeyError, match="'conv9' is not a module of ThreeLayerCNN-A"):
        build_group("cm", groups[1].network, ["conv9"], data.batch(torch.arange(2)), 4, 3)


def test_loss_weight_schedules_paper_and_authors():
    from pipeline.methods.mst.dynamic_distillation import LossWeights

    paper, authors = LossWeights(1.0, 1.0), LossWeights(1.0, 1.0, decay_after_epoch0=True)
    assert [paper.at(e)[0] for e in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    assert [authors.at(e)[0] for e in (0, 1, 30, 31)] == [1.0, 0.5, 0.5, 0.25]
    assert paper.at(10)[1] == pytest.approx(0.9) and authors.at(1)[1] == pytest.approx(0.9)
    assert authors.at(11)[1] == pytest.approx(0.81) and paper.at(11)[1] == pytest.approx(0.9)


def _stage3(cache: bool, topk: int = 1):
    from pipeline.methods.mst.dynamic_distillation import DynamicDistillation, LossWeights
    from pipeline.methods.mst.specialist_adaptation import masked_logits

    data, split, student, groups = _stage2_setup()
    for group in groups:
        group.masks.eval()
    ways = [lambda b, g=g, j=j: masked_logits(g, b, [j]) for g in groups for j in range(2)]
    torch.manual_seed(5)
    method = DynamicDistillation(copy.deepcopy(student), ways, 10, topk=topk, temperature=4.0, lb_mode="kl",
                                 lb_divide_by_n=False, weights=LossWeights(), cache=cache)
    return data, split, method


def test_stage3_with_cached_teachers_equals_recomputing_them():
    from pipeline.training.engine import EngineConfig, train

    histories = []
    for cache in (True, False):
        data, split, method = _stage3(cache)
        result = train(method, data, split, EngineConfig(epochs=2, batch_size=16, lr=1e-3), 10,
                       torch.Generator().manual_seed(0))
        histories.append(result.history)
    for a, b in zip(*histories):
        assert a.keys() == b.keys() and {"route_0", "route_3", "lambda_kd", "train_lb"} <= set(a)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        assert sum(a[f"route_{i}"] for i in range(4)) == pytest.approx(1.0)


def test_stage3_bad_settings_fail_before_training():
    with pytest.raises(ValueError, match="topk = 5 but there are 4"):
        _stage3(True, topk=5)
    from pipeline.methods.mst.dynamic_distillation import DynamicDistillation, LossWeights

    with pytest.raises(ValueError, match="load-balancing mode"):
        DynamicDistillation(_stage3(True)[2].student, [lambda b: b], 10, topk=1, temperature=4.0, lb_mode="l2",
                            lb_divide_by_n=False, weights=LossWeights())
