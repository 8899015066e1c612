"""MGDFR: co-training, the fast permutation salience against the per-feature loop, feature freezing, the KD
stage and configuration errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.common.base import check_teacher_config
from pipeline.methods.common.kl import hinton_kd_loss, softened_kl
from pipeline.methods.mgdfr import (MGDFR, MGDFRParams, co_training_terms, freeze_features, min_max_normalise,
                                    naive_permutation_salience, permutation_salience, permute_feature,
                                    permuted_copies)
from pipeline.models.registry import Network
from pipeline.params import ParamsError, parse
from pipeline.training.engine import run_phase, train
from tests.conftest import (method_block, method_setup, raw_params, role_network, run_context, synthetic_dataset,
                            synthetic_split)

N = 50  # samples: 30 train, 10 val, 10 test



def _params(**changes) -> MGDFRParams:
    """The real mgdfr block (shrunk: one co-training epoch, one permutation per feature), with `changes`."""
    return method_block("mgdfr", **{"co_epochs": {"av_digits": 1}, "repeat_permute": {"av_digits": 1}, **changes})


def _method(target: str, params: MGDFRParams | None = None, data=None) -> MGDFR:
    data = data if data is not None else synthetic_dataset(N)
    return MGDFR.from_setup(method_setup("mgdfr", "cm", target, data, block=params or _params()))


def _context(data):
    return run_context(data, synthetic_split(N), epochs=1, batch_size=8, lr=1e-3)


def _co_train_and_prepare(method: MGDFR, context, log=None):
    """Phase `co_training` as the engine runs it, then the main phase's `prepare` (salience, freezing)."""
    result = run_phase(method.co_training_phase(), context, log)
    method.prepare(context)
    return result


class _Tiny(nn.Module):
    """fc1 (3 → 4 features) then fc2, whose logits read feature 0 of fc1 only."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.residual = residual
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.weight[:, 0] = torch.tensor([1.0, -2.0])

    def forward(self, x):
        h = self.fc1(x)
        if self.residual:  # reads a tensor computed before the tap: not row-wise after it
            h = h + x.sum(dim=1, keepdim=True)
        return self.fc2(h)


def test_params_block_parses():
    raw = raw_params()["mgdfr"]
    params = parse(MGDFRParams, raw, "mgdfr", "test")
    assert params == dataclasses.replace(_params(), co_epochs=raw["co_epochs"], repeat_permute=raw["repeat_permute"])
    assert params.teachers == ["cm"] and params.co_lr == 0.001 and params.ratio == 0.75
    assert params.co_epochs == raw["co_epochs"] and params.repeat_permute["av_mnist"] == 10
    assert set(params.salience_batch_multiplier.values()) == {6}
    assert {t: row for t, row in params.taps.items() if t in ("three_layer_cnn_a", "lenet5")} == {
        "three_layer_cnn_a": {"lenet5": "conv3"}, "lenet5": {"three_layer_cnn_a": "fc1"}}
    assert params.taps["mlp_vb"] == {"mlp_tb": "fc2"}   # the unimodal nets' fc2 (baselines-spec.md §2.9)
    assert params.salience_taps["three_layer_cnn_a"]["lenet5"] == "conv3_maxpool"
    assert params.salience_taps["lenet5"]["three_layer_cnn_a"] == "fc1"
    assert (params.kd_form, params.salience) == ("authors", "all_batches")
    assert params.temperature == 4.0 and params.alpha(30) == 0.25


def test_unknown_tap_modules_are_rejected_when_the_block_is_parsed():
    for table in ("taps", "salience_taps"):
        raw = raw_params()["mgdfr"]
        raw[table]["three_layer_cnn_a"]["lenet5"] = "conv9"
        with pytest.raises(ParamsError, match=rf"mgdfr\.{table}\.three_layer_cnn_a\.lenet5.*conv9"):
            parse(MGDFRParams, raw, "mgdfr", "test")


def test_co_training_mse_reaches_both_networks():
    data = synthetic_dataset(N)
    teacher, student = role_network("m2"), role_network("m1")
    terms = co_training_terms(teacher, student, data.batch(torch.arange(6)))
    assert set(terms) == {"ce_teacher", "ce_student", "mse"}
    z_t, z_s = teacher(data.batch(torch.arange(6))), student(data.batch(torch.arange(6)))
    assert terms["mse"].item() == pytest.approx(((z_t - z_s) ** 2).mean().item(), rel=1e-5)
    terms["mse"].backward()  # the MSE alone: no detach, so both networks get a gradient
    for net in (teacher, student):
        assert all(p.grad is not None for p in net.parameters())
        assert sum(p.grad.abs().sum() for p in net.parameters()) > 0


def test_permuted_copies_stack_per_feature_permutations():
    x = torch.randn(5, 4, 2, 2)
    features = torch.tensor([1, 3])
    perms = torch.stack([torch.randperm(5), torch.randperm(5)])
    copies = permuted_copies(x, features, perms).view(2, 5, 4, 2, 2)
    for k in range(2):
        expected = x.clone()
        for b in range(5):
            expected[b, features[k]] = x[perms[k, b], features[k]]
        torch.testing.assert_close(copies[k], expected, rtol=0, atol=0)
        torch.testing.assert_close(permute_feature(x, int(features[k]), perms[k]), expected, rtol=0, atol=0)


def test_freeze_features_uses_the_batch_mean_per_feature_and_position():
    x = torch.randn(4, 3)
    y = freeze_features(x, torch.tensor([0, 2]))
    for j in (0, 2):
        mean = sum(x[i, j].item() for i in range(4)) / 4
        assert all(y[b, j].item() == pytest.approx(mean, abs=1e-6) for b in range(4))
    assert torch.equal(y[:, 1], x[:, 1])
    maps = torch.randn(4, 3, 2, 2)
    frozen = freeze_features(maps, torch.tensor([1]))
    for u in range(2):
        for v in range(2):
            mean = sum(maps[i, 1, u, v].item() for i in range(4)) / 4
            assert all(frozen[b, 1, u, v].item() == pytest.approx(mean, abs=1e-6) for b in range(4))
    assert torch.equal(frozen[:, [0, 2]], maps[:, [0, 2]])


def test_salience_finds_the_only_feature_the_logits_read():
    torch.manual_seed(0)
    teacher = Network("tiny", _Tiny(), ("m1",)).eval()
    batches = [{"m1": torch.randn(8, 3), "y": torch.zeros(8, dtype=torch.long)} for _ in range(2)]
    with torch.no_grad():  # a student agreeing with the teacher: only a decisive feature moves the MSE
        raw = permutation_salience(teacher, "fc1", batches, teacher, 3, torch.Generator().manual_seed(0))
    salience = min_max_normalise(raw)
    torch.testing.assert_close(salience, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert min_max_normalise(torch.ones(3)).tolist() == [0.0, 0.0, 0.0]


def test_fast_salience_is_refused_when_not_exact():
    teacher = Network("tiny", _Tiny(residual=True), ("m1",)).eval()
    batches = [{"m1": torch.randn(8, 3), "y": torch.zeros(8, dtype=torch.long)}]
    with pytest.raises(RuntimeError, match="not exact"):
        permutation_salience(teacher, "fc1", batches, teacher, 1, torch.Generator().manual_seed(0))


class _TinyConv(nn.Module):
    """A small ThreeLayerCNN-A: conv1, conv2 (the tap, 6 channels), ReLU + 2×2 max-pool (`pooled`), fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.pooled = nn.Identity()
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        x = self.pooled(F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("accumulate", [True, False])
def test_fast_salience_equals_the_per_feature_loop(accumulate):
    torch.manual_seed(0)
    teacher, student = Network("tiny", _TinyConv(), ("m1",)).eval(), Network("tiny", _TinyConv(), ("m1",)).eval()
    data = [{"m1": torch.randn(n, 1, 6, 6)} for n in (7, 5)]
    results = {}
    for name, salience, tap, definition in (("naive", naive_permutation_salience, "conv2", None),
                                            ("fast", permutation_salience, "conv2", None),
                                            ("fast_pooled", permutation_salience, "pooled", "conv2")):
        extra = {"definition_tap": definition} if definition else {}
        results[name] = salience(teacher, tap, iter(data), student, 3, torch.Generator().manual_seed(2),
                                 accumulate=accumulate, **extra)
    torch.testing.assert_close(results["fast"], results["naive"], rtol=1e-5, atol=1e-7)
    # permuting after ReLU and max-pool is the same salience (it commutes with per-channel operations)
    torch.testing.assert_close(results["fast_pooled"], results["naive"], rtol=1e-5, atol=1e-7)
    if not accumulate:  # only the last batch counts (official MFH)
        generator = torch.Generator().manual_seed(2)
        naive_permutation_salience(teacher, "conv2", iter(data[:1]), student, 3, generator)
        last = naive_permutation_salience(teacher, "conv2", iter(data[1:]), student, 3, generator)
        torch.testing.assert_close(results["naive"], last)


def test_three_layer_cnn_a_salience_at_conv3_maxpool_equals_conv3():
    """The default salience tap of the audio teacher: the same values as the authors' conv3 permutation."""
    torch.manual_seed(0)
    data = synthetic_dataset(N)
    teacher, student = role_network("m2").eval(), role_network("m1").eval()
    values = [permutation_salience(teacher, tap, data.batches(torch.arange(16), 8), student, 1,
                                   torch.Generator().manual_seed(2), definition_tap="conv3")
              for tap in ("conv3", "conv3_maxpool")]
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-7)


def test_fast_salience_chunking_does_not_change_the_result():
    data = synthetic_dataset(N)
    teacher, student = role_network("m1").eval(), role_network("m2").eval()
    values = [permutation_salience(teacher, "fc1", data.batches(torch.arange(16), 8), student, 1,
                                   torch.Generator().manual_seed(0), chunk_elements=chunk) for chunk in (1, 10**9)]
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target", ["m1", "m2"])
def test_builds_prepares_and_trains_the_student(target):
    """With `masking: freeze` (MFH's intent) the lowest-salience 75 % of the teacher's features are frozen."""
    data = synthetic_dataset(N)
    method = _method(target, dataclasses.replace(_params(), masking="freeze"), data=data)
    assert method.teacher.arch == ("three_layer_cnn_a" if target == "m1" else "lenet5")
    context = _context(data)
    assert [phase.name for phase in method.phases(context)] == ["co_training", "main"]
    logged = []
    _co_train_and_prepare(method, context, log=lambda phase, epoch, metrics: logged.append((phase, epoch, metrics)))
    assert [(phase, epoch) for phase, epoch, _ in logged] == [("co_training", 0)]
    assert set(logged[0][2]) == {"train_ce_teacher", "train_ce_student", "train_mse", "train_loss", "best_epoch"}
    features = 128 if target == "m1" else 84
    assert method.salience.shape == (features,)
    assert method.salience.min() == 0 and method.salience.max() == 1
    assert len(method.frozen_features) == int(0.75 * features)
    kept = torch.ones(features, dtype=torch.bool)
    kept[method.frozen_features] = False
    assert method.salience[method.frozen_features].max() <= method.salience[kept].min()
    assert method.co_student is None and not method.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    optimizer = method.configure_optimizer(1e-3)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in method.student.parameters()}
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    batch = data.batch(synthetic_split(N)["train"][:8])
    for _ in range(2):
        terms = method.loss_terms(batch, 0)
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in method.teacher.state_dict().items())
    # every teacher forward freezes the low-salience features to the batch mean
    tap = method.teacher.body.get_submodule(method.tap)
    handle = method._freeze_handle
    handle.remove()
    with torch.no_grad():
        plain = tap.register_forward_hook(lambda _m, _i, out: freeze_features(out, method.frozen_features))
        expected = method.teacher(batch)
        plain.remove()
        unfrozen = method.teacher(batch)
    method._freeze_handle = tap.register_forward_hook(lambda _m, _i, out: freeze_features(out, method.frozen_features))
    torch.testing.assert_close(method.teacher_logits(batch), expected)
    assert not torch.allclose(unfrozen, expected)


@pytest.mark.parametrize("target", ["m1", "m2"])
def test_default_masking_is_the_authors_none(target):
    """The default `masking: none` does what the authors' code does: the salience is computed but the
    teacher's logits are those of the unhooked co-trained teacher (baselines quirk Q13)."""
    data = synthetic_dataset(N)
    assert _params().masking == "none"
    method = _method(target, data=data)
    context = _context(data)
    _co_train_and_prepare(method, context)
    assert method.salience is not None and len(method.frozen_features) == 0 and method._freeze_handle is None
    batch = data.batch(synthetic_split(N)["train"][:8])
    with torch.no_grad():
        plain = method.teacher(batch)
    torch.testing.assert_close(method.teacher_logits(batch), plain, rtol=0, atol=0)


def test_kd_stage_losses_and_uncacheable_teacher():
    data = synthetic_dataset(N)
    context = _context(data)
    method = _method("m2", dataclasses.replace(_params(), masking="freeze"), data=data)
    _co_train_and_prepare(method, context)
    batch = data.batch(synthetic_split(N)["train"][:8])
    logits, teacher = method.student(batch), method.teacher_logits(batch)
    terms = method.loss_terms(batch, 30)  # α = 0.25
    assert terms["ce"].item() == pytest.approx(0.75 * F.cross_entropy(logits, batch["y"]).item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.25 * hinton_kd_loss(logits, teacher, 4.0).item(), rel=1e-5)
    assert method.epoch_values(30) == {"alpha": 0.25}
    official = method
    official.kd_form = "official"
    terms = official.loss_terms(batch, 30)
    assert set(terms) == {"kd"} and official.epoch_values(0) == {}
    expected = softened_kl(official.student(batch), official.teacher_logits(batch), 1.0)
    assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    # the frozen features take the batch mean: a sample's teacher logits depend on its batch mates
    alone = method.teacher_logits(data.batch(batch["index"][:4]))
    assert not torch.allclose(alone, teacher[:4])


def test_engine_run_co_trains_the_teacher_then_keeps_it_frozen():
    data = synthetic_dataset(N)
    method = _method("m2", data=data)
    initial = copy.deepcopy(method.teacher.state_dict())
    co_trained = {}

    def log(phase, epoch, metrics):
        if phase == "co_training":  # no selection in co-training: the last epoch's teacher is kept
            co_trained.update(copy.deepcopy(method.teacher.state_dict()))

    result = train(method, _context(data), log)
    assert [(p.name, len(p.history)) for p in result.phases] == [("co_training", 1), ("main", 1)]
    assert any(not torch.equal(initial[k], v) for k, v in co_trained.items())  # the teacher was co-trained
    assert all(torch.equal(co_trained[k], v) for k, v in method.teacher.state_dict().items())  # then frozen
    assert not method.teacher.training and method.co_student is None
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert {"train_ce", "train_kd", "val_loss", "alpha"} <= set(result.final.history[0])


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="does not support teacher config 'mm'"):
        check_teacher_config(MGDFR, "mm")
    check_teacher_config(MGDFR, "cm")
    params = _params()
    with pytest.raises(KeyError, match="conv9"):  # an unchecked block reaching the method
        _method("m1", dataclasses.replace(params, taps={"three_layer_cnn_a": {"lenet5": "conv9"},
                                                        "lenet5": {"three_layer_cnn_a": "fc1"}}))
    with pytest.raises(KeyError, match="mgdfr.taps.lenet5.three_layer_cnn_a is missing"):
        _method("m2", dataclasses.replace(params, taps={"three_layer_cnn_a": {"lenet5": "conv3"}}))
    with pytest.raises(KeyError, match="mgdfr.salience_taps.lenet5.three_layer_cnn_a is missing"):
        _method("m2", dataclasses.replace(params, salience_taps={"three_layer_cnn_a": {"lenet5": "conv3_maxpool"}}))
    with pytest.raises(KeyError, match="mgdfr.co_epochs.av_digits is missing"):
        _method("m2", dataclasses.replace(params, co_epochs={"av_mnist": 1}))
    with pytest.raises(ValueError, match="features"):
        _method("m1", dataclasses.replace(
            params, salience_taps={"three_layer_cnn_a": {"lenet5": "conv3_maxpool_flatten"}}))
