"""C²KD: Kendall τ-b, the non-target KL and its mask, the proxy heads, the trained teacher, SGD and its
learning-rate schedules, selection, taps and params."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau

from pipeline.methods.common.base import MethodSetup, check_teacher_config
from pipeline.methods.c2kd import (C2KD, C2KDParams, C2KDTaps, ProxyNet, ProxyNet1D, build_proxy, kendall_tau_b,
                                   masked_non_target_kl, mutual_kl, non_target_kl, poly_lr)
from pipeline.params import ParamsError, parse
from pipeline.training.engine import train
from tests.conftest import method_block, method_setup, raw_params, run_context, synthetic_dataset, synthetic_split



def _params(**changes) -> C2KDParams:
    """The real c2kd block of params.yaml, with `changes`."""
    return method_block("c2kd", **changes)


def _setup(data, target: str, params: C2KDParams | None = None) -> MethodSetup:
    """The pipeline's setup for a CM teacher (the other modality's network, built first) and a fresh student."""
    return method_setup("c2kd", "cm", target, data, block=params or _params())


def _context(data, epochs: int = 3, batch_size: int = 16):
    return run_context(data, synthetic_split(), epochs=epochs, batch_size=batch_size, lr=1e-3)


def test_params_block_parses():
    p = parse(C2KDParams, raw_params()["c2kd"], "c2kd", "test")
    assert p == _params()
    assert p.teachers == ["cm"]
    assert p.taps["three_layer_cnn_a"] == {"lenet5": C2KDTaps(teacher="conv3_maxpool", student="fc1")}
    assert p.taps["lenet5"] == {"three_layer_cnn_a": C2KDTaps(teacher="fc1", student="conv3_maxpool")}
    assert p.taps["visual_branch_net"] == {"audio_branch_net": C2KDTaps(teacher="fc1", student="fc1")}  # spec §2.10
    assert p.taps["mlp_tb"] == {"mlp_vb": C2KDTaps(teacher="fc2", student="fc2")}
    assert (p.lr, p.momentum, p.krc, p.lr_schedule, p.selection) == (0.01, 0.9, 0.0, "constant", "val_loss")
    assert (p.poly_power, p.poly_min_lr, p.selection_start) == (0.9, 1e-4, 0.8)


def test_unknown_tap_modules_are_rejected_when_the_block_is_parsed():
    raw = raw_params()["c2kd"]
    raw["taps"]["three_layer_cnn_a"]["lenet5"]["teacher"] = "conv9"
    with pytest.raises(ParamsError, match=r"c2kd\.taps\.three_layer_cnn_a\.lenet5.*conv9"):
        parse(C2KDParams, raw, "c2kd", "test")
    raw = raw_params()["c2kd"]
    raw["taps"]["lenet5"]["resnet"] = raw["taps"]["lenet5"]["three_layer_cnn_a"]
    with pytest.raises(ParamsError, match=r"c2kd\.taps\.lenet5\.resnet.*unknown architecture"):
        parse(C2KDParams, raw, "c2kd", "test")


def test_only_the_cm_teacher_is_supported():
    check_teacher_config(C2KD, "cm")
    for config in ("mm", "mm+cm"):
        with pytest.raises(ValueError, match="does not support teacher config"):
            check_teacher_config(C2KD, config)


def test_kendall_tau_b_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    tied_x, tied_y = rng.integers(0, 3, (30, 10)), rng.integers(0, 4, (30, 10))  # many ties in both
    smooth_x, smooth_y = rng.normal(size=(30, 10)), rng.normal(size=(30, 10))
    for x, y in ((tied_x, tied_y), (smooth_x, smooth_y), (tied_x, smooth_y)):
        got = kendall_tau_b(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
        expected = [kendalltau(a, b).statistic for a, b in zip(x, y)]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    # perfectly (anti-)concordant rows, and a constant row (undefined: scipy NaN, here 0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    y = torch.tensor([[0.1, 0.5, 0.7, 0.9], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert kendall_tau_b(x, y).tolist() == [1.0, -1.0, 0.0]


def _explicit_ntkl(learner, target, labels):
    """Per-sample KL with the label's logit set to 0 in both vectors, by loops."""
    out = []
    for s, t, y in zip(learner.tolist(), target.tolist(), labels.tolist()):
        s = [0.0 if c == y else v for c, v in enumerate(s)]
        t = [0.0 if c == y else v for c, v in enumerate(t)]
        zs, zt = sum(math.exp(v) for v in s), sum(math.exp(v) for v in t)
        ps, pt = [math.exp(v) / zs for v in s], [math.exp(v) / zt for v in t]
        out.append(sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt)))
    return out


def test_non_target_kl_matches_an_explicit_loop():
    torch.manual_seed(0)
    learner, target = torch.randn(6, 5) * 2, torch.randn(6, 5) * 2
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    got = non_target_kl(learner, target, labels)
    assert got.tolist() == pytest.approx(_explicit_ntkl(learner, target, labels), rel=1e-5)


def test_masked_non_target_kl_averages_over_the_full_batch_and_vanishes_with_an_empty_mask():
    torch.manual_seed(1)
    learner = torch.randn(6, 5, requires_grad=True)
    target = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    per_sample = _explicit_ntkl(learner.detach(), target.detach(), labels)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    got = masked_non_target_kl(learner, target, labels, mask)
    assert got.item() == pytest.approx((per_sample[0] + per_sample[2] + per_sample[5]) / 6, rel=1e-5)
    got.backward()
    assert target.grad is None  # the target side is detached
    assert torch.all(learner.grad[mask == 0] == 0) and torch.any(learner.grad[mask == 1] != 0)
    learner.grad = None
    empty = masked_non_target_kl(learner, target, labels, torch.zeros(6))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.all(learner.grad == 0)


def test_mutual_kl_is_both_directions_each_with_the_other_side_detached():
    torch.manual_seed(2)
    z, q = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    expected = 0.0
    for a, b in zip(z.tolist(), q.tolist()):
        pa = [math.exp(v) / sum(math.exp(u) for u in a) for v in a]
        pb = [math.exp(v) / sum(math.exp(u) for u in b) for v in b]
        expected += sum(x * math.log(x / y) for x, y in zip(pa, pb)) + sum(y * math.log(y / x) for x, y in zip(pa, pb))
    assert mutual_kl(z, q).item() == pytest.approx(expected / 4, rel=1e-5)
    # each side only receives the gradient of the term in which it is the learner
    mutual_kl(z, q).backward()
    z_ref, q_ref = z.detach().clone().requires_grad_(True), q.detach().clone().requires_grad_(True)
    F.kl_div(F.log_softmax(z_ref, 1), F.softmax(q.detach(), 1), reduction="batchmean").backward()
    F.kl_div(F.log_softmax(q_ref, 1), F.softmax(z.detach(), 1), reduction="batchmean").backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(q.grad, q_ref.grad)


def test_proxy_heads_and_their_choice_by_feature_shape():
    torch.manual_seed(0)
    vector_proxy = build_proxy((84,), 10)
    map_proxy = build_proxy((128, 2, 2), 10)
    assert isinstance(vector_proxy, ProxyNet1D) and isinstance(map_proxy, ProxyNet)
    assert vector_proxy(torch.randn(5, 84)).shape == (5, 10)
    assert map_proxy(torch.randn(5, 128, 2, 2)).shape == (5, 10)
    assert torch.all(vector_proxy.fc1.bias == 0) and torch.all(vector_proxy.fc2.bias == 0)
    assert map_proxy.conv.bias is None
    # Kaiming normal, fan_out: std = sqrt(2 / fan_out)
    weight = ProxyNet1D(400, 400).fc1.weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.05)
    with pytest.raises(ValueError, match="vector"):
        build_proxy((3, 4), 10)


@pytest.mark.parametrize("target, proxy_types", [("m1", (ProxyNet, ProxyNet1D)), ("m2", (ProxyNet1D, ProxyNet))])
def test_builds_and_trains_teacher_student_and_proxies(target, proxy_types):
    data = synthetic_dataset()
    method = C2KD.from_setup(_setup(data, target))
    assert (type(method.proxy_teacher), type(method.proxy_student)) == proxy_types
    method.prepare(_context(data))
    optimizer = method.configure_optimizer(1e-3)
    before = {name: copy.deepcopy(module.state_dict()) for name, module in
              (("teacher", method.teacher), ("student", method.student), ("proxy_teacher", method.proxy_teacher),
               ("proxy_student", method.proxy_student))}
    method.train()
    assert method.teacher.training
    batch = data.batch(synthetic_split()["train"][:16])
    for _ in range(2):
        terms = method.loss_terms(batch, 0)
        assert set(terms) == {"ce_teacher", "ce_student", "kl_teacher_proxy", "kl_student_proxy", "ntkl"}
        loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in method.teacher.parameters())
        optimizer.step()
    assert torch.isfinite(loss)
    for name, module in (("teacher", method.teacher), ("student", method.student),
                         ("proxy_teacher", method.proxy_teacher), ("proxy_student", method.proxy_student)):
        assert any(not torch.equal(before[name][k], v) for k, v in module.state_dict().items()), name


def test_loss_terms_match_the_formula_with_a_scipy_mask():
    data = synthetic_dataset()
    method = C2KD.from_setup(_setup(data, "m2"))
    method.train()
    batch = data.batch(torch.arange(12))
    terms = method.loss_terms(batch, 0)
    # recompute from the same modules (train mode: the proxies' BN normalises by batch statistics again)
    z_t, z_s = method.teacher(batch), method.student(batch)
    q_t = method.proxy_teacher(method.teacher.body.fc1(
        torch.flatten(F.relu(method.teacher.body.conv3(F.avg_pool2d(F.relu(method.teacher.body.conv2(
            F.avg_pool2d(F.relu(method.teacher.body.conv1(batch["m1"])), 2))), 2))), 1)))
    body = method.student.body
    x = F.max_pool2d(F.relu(body.conv1(batch["m2"])), 2)
    x = F.max_pool2d(F.relu(body.conv2(x)), 2)
    q_s = method.proxy_student(F.max_pool2d(F.relu(body.conv3(x)), 2))
    y = batch["y"]
    tau = [kendalltau(a, b).statistic for a, b in zip(q_t.detach().numpy(), q_s.detach().numpy())]
    mask = torch.tensor([1.0 if t > 0 else 0.0 for t in tau])
    ntkl = sum(m * (a + b) for m, a, b in zip(mask.tolist(), _explicit_ntkl(q_s.detach(), q_t.detach(), y),
                                               _explicit_ntkl(q_t.detach(), q_s.detach(), y))) / len(y)
    assert terms["ce_teacher"].item() == pytest.approx(F.cross_entropy(z_t, y).item(), rel=1e-5)
    assert terms["ce_student"].item() == pytest.approx(F.cross_entropy(z_s, y).item(), rel=1e-5)
    assert terms["kl_teacher_proxy"].item() == pytest.approx(mutual_kl(z_t, q_t).item(), rel=1e-5)
    assert terms["kl_student_proxy"].item() == pytest.approx(mutual_kl(z_s, q_s).item(), rel=1e-5)
    assert terms["ntkl"].item() == pytest.approx(ntkl, rel=1e-4, abs=1e-7)


def test_optimizer_is_sgd_with_c2kd_lr_over_teacher_student_and_proxies():
    data = synthetic_dataset()
    method = C2KD.from_setup(_setup(data, "m1"))
    optimizer = method.configure_optimizer(1e-3)  # the engine's lr is ignored
    assert isinstance(optimizer, torch.optim.SGD)
    (group,) = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 0.0)
    expected = {id(p) for m in (method.teacher, method.student, method.proxy_teacher, method.proxy_student)
                for p in m.parameters()}
    assert {id(p) for p in group["params"]} == expected


def test_constant_and_poly_learning_rate_schedules():
    data = synthetic_dataset()
    split = synthetic_split()
    batches = math.ceil(len(split["train"]) / 16)
    for schedule in ("constant", "poly"):
        method = C2KD.from_setup(_setup(data, "m1", _params(lr_schedule=schedule)))
        method.prepare(_context(data, epochs=3, batch_size=16))
        optimizer = method.configure_optimizer(1e-3)
        batch = data.batch(split["train"][:16])
        seen = []
        with torch.no_grad():
            for epoch in range(2):
                for _ in range(batches):
                    method.loss_terms(batch, epoch)
                    seen.append(optimizer.param_groups[0]["lr"])
        if schedule == "constant":
            assert seen == [0.01] * len(seen)
            assert method.epoch_values(1) == {"lr": 0.01}
        else:
            total = 3 * batches
            expected = [1e-4 + (0.01 - 1e-4) * (1 - step / total) ** 0.9 for step in range(2 * batches)]
            assert seen == pytest.approx(expected, rel=1e-12)
            assert seen[0] == 0.01 and method.epoch_values(1)["lr"] == pytest.approx(expected[batches])
    assert poly_lr(0.01, 1e-4, 0.9, 1.0) == 1e-4


def test_poly_schedule_needs_prepare():
    data = synthetic_dataset()
    method = C2KD.from_setup(_setup(data, "m1", _params(lr_schedule="poly")))
    method.configure_optimizer(1e-3)
    with pytest.raises(RuntimeError, match="prepare"):
        method.loss_terms(data.batch(torch.arange(4)), 0)


def test_selection_switch():
    data = synthetic_dataset()
    context = _context(data, epochs=10)
    default = C2KD.from_setup(_setup(data, "m1"))
    assert default.validation_score(context, 9) is None  # the engine's min val CE
    late = C2KD.from_setup(_setup(data, "m1", _params(selection="late_val_accuracy")))
    assert late.validation_score(context, 7) == math.inf
    score = late.validation_score(context, 8)
    assert -1.0 <= score <= 0.0
    assert late.validation_score(context, 9) < score  # same weights, same accuracy: the later epoch wins


def test_engine_run_trains_the_teacher():
    data = synthetic_dataset()
    method = C2KD.from_setup(_setup(data, "m2"))
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    result = train(method, _context(data, epochs=2))
    assert [p.name for p in result.phases] == ["main"] and len(result.final.history) == 2
    assert result.final.history[-1]["lr"] == 0.01 and math.isfinite(result.final.history[-1]["train_loss"])
    assert method.teacher.training and all(p.requires_grad for p in method.teacher.parameters())
    assert any(not torch.equal(teacher_before[k], v) for k, v in method.teacher.state_dict().items())


def test_missing_taps_are_clear_key_errors():
    data = synthetic_dataset()
    taps = _params().taps
    with pytest.raises(KeyError, match=r"c2kd\.taps\.three_layer_cnn_a\.lenet5 is missing"):
        C2KD.from_setup(_setup(data, "m1", _params(taps={})))
    with pytest.raises(KeyError, match=r"c2kd\.taps\.three_layer_cnn_a\.lenet5 is missing"):
        C2KD.from_setup(_setup(data, "m1", _params(taps={"lenet5": taps["lenet5"]})))
    with pytest.raises(KeyError, match=r"c2kd\.taps\.lenet5\.three_layer_cnn_a is missing"):
        C2KD.from_setup(_setup(data, "m2", _params(taps={"three_layer_cnn_a": taps["three_layer_cnn_a"]})))
    bad = {"three_layer_cnn_a": {"lenet5": C2KDTaps(teacher="conv9", student="fc1")}}
    with pytest.raises(KeyError, match="no module named 'conv9'"):  # an unchecked block reaching the method
        C2KD.from_setup(_setup(data, "m1", _params(taps=bad)))
