"""DML: the mutual-learning loss, its detach points, the three trained networks, the optimiser's
equivalence with three separate Adams, the MST collaborative-initialisation variant and the params block."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from pipeline.methods.common.base import check_teacher_config
from pipeline.methods.dml import VARIANTS, DeepMutualLearning, DMLParams, PeerLoss, mutual_learning_terms
from pipeline.methods.mst.losses import bidirectional_alignment
from pipeline.params import ParamsError, parse
from tests.conftest import method_block, method_setup, raw_params, run_context, synthetic_dataset, synthetic_split



def _params(**changes) -> DMLParams:
    """The real dml block of params.yaml, with `changes`."""
    return method_block("dml", **changes)


def _method(data, target: str, params: DMLParams | None = None) -> DeepMutualLearning:
    return DeepMutualLearning.from_setup(method_setup("dml", "mm+cm", target, data, block=params or _params()))


def _step(method, optimizer, batch):
    terms = method.loss_terms(batch, 0)
    optimizer.zero_grad()
    torch.stack(list(terms.values())).sum().backward()
    optimizer.step()
    return terms


def test_params_block_parses_and_variants_are_as_documented():
    p = parse(DMLParams, raw_params()["dml"], "dml", "test")
    assert p == _params()
    assert (p.teachers, p.variant, p.kl_weight) == (["mm+cm"], "dml", 1.0)
    assert set(VARIANTS) == {"dml", "mst_collaborative_init"}
    assert VARIANTS["dml"] == PeerLoss(temperature=1.0, detach_peers=True, peer_reduction="mean")
    assert VARIANTS["mst_collaborative_init"] == PeerLoss(temperature=4.0, detach_peers=False, peer_reduction="sum")


def test_the_old_variant_name_is_rejected_with_the_key():
    raw = raw_params()["dml"]
    raw["variant"] = "authors_stage1"  # renamed mst_collaborative_init
    with pytest.raises(ParamsError, match=r"dml\.variant.*mst_collaborative_init"):
        parse(DMLParams, raw, "dml", "test")


def test_only_mm_plus_cm_is_supported():
    check_teacher_config(DeepMutualLearning, "mm+cm")
    for config in ("mm", "cm"):
        with pytest.raises(ValueError, match="does not support teacher config"):
            check_teacher_config(DeepMutualLearning, config)


def _explicit(logits, labels, temperature, kl_weight, reduction):
    """ce_n and kl_n by loops over samples and classes."""
    def softmax(row, t):
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    out = {}
    names = list(logits)
    batch = len(labels)
    for n in names:
        own = logits[n].tolist()
        ce = sum(-math.log(softmax(row, 1.0)[y]) for row, y in zip(own, labels.tolist())) / batch
        kls = []
        for m in names:
            if m == n:
                continue
            kl = 0.0
            for row_n, row_m in zip(own, logits[m].tolist()):
                p_n, p_m = softmax(row_n, temperature), softmax(row_m, temperature)
                kl += sum(b * math.log(b / a) for a, b in zip(p_n, p_m))
            kls.append(kl / batch * temperature**2)
        out[f"ce_{n}"] = ce
        out[f"kl_{n}"] = kl_weight * (sum(kls) / len(kls) if reduction == "mean" else sum(kls))
    return out


@pytest.mark.parametrize("peer_loss, kl_weight", [(VARIANTS["dml"], 1.0), (VARIANTS["mst_collaborative_init"], 1.0),
                                                  (PeerLoss(2.0, True, "mean"), 0.5)])
def test_loss_matches_explicit_formula(peer_loss, kl_weight):
    torch.manual_seed(0)
    logits = {"student": torch.randn(5, 4), "mm": torch.randn(5, 4) * 2, "cm": torch.randn(5, 4)}
    labels = torch.tensor([0, 3, 1, 1, 2])
    got = mutual_learning_terms(logits, labels, peer_loss, kl_weight)
    expected = _explicit(logits, labels, peer_loss.temperature, kl_weight, peer_loss.peer_reduction)
    assert set(got) == set(expected) == {"ce_student", "kl_student", "ce_mm", "kl_mm", "ce_cm", "kl_cm"}
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, rel=1e-5), key


def test_mst_collaborative_init_equals_mst_stage1_alignment():
    """The summed peer terms of `mst_collaborative_init` are MST-Distill phase 1's symmetric, undetached T = 4 alignment."""
    torch.manual_seed(1)
    logits = {"mm": torch.randn(6, 5), "student": torch.randn(6, 5), "cm": torch.randn(6, 5)}
    terms = mutual_learning_terms(logits, torch.zeros(6, dtype=torch.long), VARIANTS["mst_collaborative_init"])
    total = terms["kl_student"] + terms["kl_mm"] + terms["kl_cm"]
    assert total.item() == pytest.approx(bidirectional_alignment(list(logits.values()), 4.0).item(), rel=1e-6)


def test_detached_peers_get_no_gradient_from_another_networks_kl():
    data = synthetic_dataset()
    batch = data.batch(torch.arange(8))
    for variant, crosses in (("dml", False), ("mst_collaborative_init", True)):
        method = _method(data, "m1", _params(variant=variant))
        method.loss_terms(batch, 0)["kl_student"].backward()
        assert all(p.grad is not None for p in method.student.parameters())
        peers_have_grad = [p.grad is not None and bool(p.grad.abs().sum() > 0)
                           for net in (method.mm_network, method.cm_network) for p in net.parameters()]
        assert any(peers_have_grad) == crosses, variant


@pytest.mark.parametrize("target", ["m1", "m2"])
def test_builds_three_networks_and_all_of_them_train(target):
    data = synthetic_dataset()
    method = _method(data, target)
    other = "m2" if target == "m1" else "m1"
    assert method.student.inputs == (target,) and method.cm_network.inputs == (other,)
    assert method.mm_network.inputs == ("m1", "m2")
    method.prepare(run_context(data, synthetic_split(), epochs=2, batch_size=16, lr=1e-3))
    optimizer = method.configure_optimizer(1e-3)
    assert isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 3
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)
    before = {n: copy.deepcopy(getattr(method, n).state_dict()) for n in ("student", "mm_network", "cm_network")}
    method.train()
    batch = data.batch(synthetic_split()["train"][:16])
    for _ in range(2):
        terms = _step(method, optimizer, batch)
    assert all(torch.isfinite(v) for v in terms.values())
    for name, state in before.items():
        assert any(not torch.equal(state[k], v) for k, v in getattr(method, name).state_dict().items()), name


def test_deterministic_build_order():
    data = synthetic_dataset()
    a, b = _method(data, "m2"), _method(data, "m2")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_one_adam_equals_three_separate_adams():
    data = synthetic_dataset()
    batch = data.batch(synthetic_split()["train"][:16])
    joint = _method(data, "m1")
    separate = copy.deepcopy(joint)
    joint_optimizer = joint.configure_optimizer(1e-3)
    nets = (separate.student, separate.mm_network, separate.cm_network)
    optimizers = [torch.optim.Adam(net.parameters(), lr=1e-3, fused=True) for net in nets]
    for _ in range(2):
        _step(joint, joint_optimizer, batch)
        terms = separate.loss_terms(batch, 0)
        for name, optimizer in zip(("student", "mm", "cm"), optimizers):
            optimizer.zero_grad()
            (terms[f"ce_{name}"] + terms[f"kl_{name}"]).backward(retain_graph=True)
            optimizer.step()
    for name in ("student", "mm_network", "cm_network"):
        expected = getattr(separate, name).state_dict()
        for key, value in getattr(joint, name).state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.mark.parametrize("variant", ["dml", "mst_collaborative_init"])
@pytest.mark.parametrize("reduction", ["variant", "mean", "sum"])
def test_peer_reduction_switch_overrides_only_the_reduction(variant, reduction):
    """`peer_reduction: sum` is Zhang et al.'s official code (peer KLs added); `variant` keeps the variant's own."""
    p = dataclasses.replace(_params(), variant=variant, peer_reduction=reduction)
    loss = p.peer_loss()
    expected = VARIANTS[variant].peer_reduction if reduction == "variant" else reduction
    assert loss == dataclasses.replace(VARIANTS[variant], peer_reduction=expected)
    logits = {"student": torch.randn(6, 10), "mm": torch.randn(6, 10), "cm": torch.randn(6, 10)}
    labels = torch.randint(0, 10, (6,))
    summed = mutual_learning_terms(logits, labels, dataclasses.replace(loss, peer_reduction="sum"), 1.0)
    terms = mutual_learning_terms(logits, labels, loss, 1.0)
    for name in ("student", "mm", "cm"):
        factor = 1.0 if expected == "sum" else 0.5  # two peers each
        torch.testing.assert_close(terms[f"kl_{name}"], factor * summed[f"kl_{name}"])
