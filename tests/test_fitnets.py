"""FitNets: regressors and the hint loss against hand computations, the hint and main phases, caching and errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import check_teacher_config
from pipeline.methods.common.kl import hinton_kd_loss
from pipeline.methods.fitnets import (FitNets, FitNetsParams, HintPair, HintRegressor, Regressor1D, hint_loss,
                                      trunk_parameter_names)
from pipeline.params import ParamsError, parse
from pipeline.training.engine import run_phase, train
from tests.conftest import (method_block, method_setup, raw_params, role_network, run_context, synthetic_dataset,
                            synthetic_split)

N = 50  # samples: 30 train, 10 val, 10 test



def _params(**changes) -> FitNetsParams:
    """The real fitnets block (shrunk: one hint epoch on AV-Digits), with `changes`."""
    return method_block("fitnets", **{"hint_epochs": {"av_digits": 1}, **changes})


def _method(config: str, target: str, params: FitNetsParams | None = None, cache: bool = True, data=None) -> FitNets:
    data = data if data is not None else synthetic_dataset(N)
    return FitNets.from_setup(method_setup("fitnets", config, target, data, block=params or _params(), cache=cache))


def _context(data):
    return run_context(data, synthetic_split(N), epochs=2, batch_size=16, lr=1e-3)


def _hint(method: FitNets, context, log=None):
    """Phase `hint` as the engine runs it, then the main phase's `prepare` (the teacher-logit cache)."""
    result = run_phase(method.hint_phase(context), context, log)
    method.prepare(context)
    return result


def test_params_block_parses():
    raw = raw_params()["fitnets"]
    params = parse(FitNetsParams, raw, "fitnets", "test")
    assert params == method_block("fitnets", hint_epochs=raw["hint_epochs"])  # shrinking only touches hint_epochs
    assert params.teachers == ["mm", "cm"] and params.hint_epochs == raw["hint_epochs"]
    assert all(isinstance(v, int) and v >= 0 for v in params.hint_epochs.values())
    assert params.hint_lr == 0.001 and params.hint_scope == "tapped_layers" and params.selection == "combined"
    assert params.temperature == 4.0
    assert params.alpha == AlphaParams(0.5, "authors_step", 30, 0.5)
    pair = params.taps["lenet5"]["three_layer_cnn_a"][0]
    assert pair == HintPair(teacher="conv1", student="conv2", regressor="down")
    av = {"cnn_i", "lenet5", "three_layer_cnn_a"}   # the other datasets' pairs: tests/test_dataset_methods.py
    assert {(t, s) for t, row in params.taps.items() for s in row if t in av} == {
        ("cnn_i", "lenet5"), ("cnn_i", "three_layer_cnn_a"), ("lenet5", "three_layer_cnn_a"),
        ("three_layer_cnn_a", "lenet5")}
    assert params.taps["dscnn_i"]["audio_branch_net"] == [HintPair("fc1", "fc1", "r1d"), HintPair("fc2", "fc2", "r1d")]
    assert all(len(pairs) == 2 for row in params.taps.values() for pairs in row.values())
    assert params.alpha(29) == 0.5 and params.alpha(30) == 0.25


def test_unknown_tap_modules_are_rejected_when_the_block_is_parsed():
    raw = raw_params()["fitnets"]
    raw["taps"]["three_layer_cnn_a"]["lenet5"][0]["student"] = "conv9"
    with pytest.raises(ParamsError, match=r"fitnets\.taps\.three_layer_cnn_a\.lenet5.*conv9"):
        parse(FitNetsParams, raw, "fitnets", "test")
    raw = raw_params()["fitnets"]
    raw["taps"]["cnn_i"]["lenet5"][1]["regressor"] = "sideways"
    with pytest.raises(ParamsError, match=r"fitnets\.taps\.cnn_i\.lenet5\[1\]\.regressor"):
        parse(FitNetsParams, raw, "fitnets", "test")


def test_r1d_regressor_matches_hand_computation():
    """Conv1d(1→1, k3, p1, stride 8 // 3 = 2) then nearest resizing of 4 outputs to 3 (source ⌊j·4/3⌋)."""
    reg = Regressor1D(8, 3)
    w, b = [0.5, -1.0, 2.0], 0.25
    with torch.no_grad():
        reg.conv.weight.copy_(torch.tensor(w).view(1, 1, 3))
        reg.conv.bias.fill_(b)
    x = [1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5, 0.0]
    padded = [0.0, *x, 0.0]
    conv = [sum(w[j] * padded[2 * k + j] for j in range(3)) + b for k in range(4)]
    expected = [conv[(j * 4) // 3] for j in range(3)]
    got = reg(torch.tensor([x]))
    assert got.shape == (1, 3)
    torch.testing.assert_close(got[0], torch.tensor(expected))
    assert sum(p.numel() for p in reg.parameters()) == 4


@pytest.mark.parametrize("kind,shape_in,shape_out", [
    ("r1d", (512,), (120,)), ("r1d", (120,), (512,)), ("r1d", (84,), (298,)),
    ("r2d_to_1d", (120, 1, 1), (596,)), ("r2d_to_1d", (128, 4, 4), (298,)),
    ("down", (64, 8, 8), (6, 28, 28)),      # AV-Digits: 4×4 resized to 28×28
    ("up", (6, 28, 28), (64, 8, 8)),        # AV-Digits: input 28×28 resized to 4×4
    ("down", (64, 56, 56), (6, 28, 28)),    # AV-MNIST: no resizing
    ("up", (6, 28, 28), (64, 56, 56)), ("same", (16, 10, 10), (16, 10, 10))])
def test_regressors_produce_the_teacher_tap_shape(kind, shape_in, shape_out):
    reg = HintRegressor(kind, shape_in, shape_out)
    assert reg(torch.randn(3, *shape_in)).shape == (3, *shape_out)


def test_2d_regressor_resizes_only_on_mismatch():
    reg = HintRegressor("down", (64, 56, 56), (6, 28, 28))
    x = torch.randn(2, 64, 56, 56)
    torch.testing.assert_close(reg(x), reg.body(x))
    reg = HintRegressor("down", (64, 8, 8), (6, 28, 28))  # too small an output: enlarged afterwards
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(reg(x), F.interpolate(reg.body(x), size=(28, 28), mode="nearest"))
    reg = HintRegressor("up", (6, 28, 28), (64, 8, 8))  # too large an output: the input is shrunk first
    x = torch.randn(2, 6, 28, 28)
    torch.testing.assert_close(reg(x), reg.body(F.interpolate(x, size=(4, 4), mode="nearest")))
    reg = HintRegressor("up", (6, 28, 28), (64, 9, 9))  # no input size gives 9×9: the output is resized
    assert reg.input_size is None and reg(x).shape == (2, 64, 9, 9)
    with pytest.raises(ValueError, match="feature map"):
        HintRegressor("down", (84,), (6, 28, 28))


def test_hint_loss_is_the_sum_of_pair_mses():
    a, b = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    c, d = torch.tensor([[3.0]]), torch.tensor([[1.0]])
    expected = (1 + 0 + 1 + 4) / 4 + 4.0
    assert hint_loss([a, c], [b, d]).item() == pytest.approx(expected)
    target = b.clone().requires_grad_(True)
    hint_loss([a.requires_grad_(True)], [target]).backward()
    assert target.grad is None and a.grad is not None


@pytest.mark.parametrize("config,target", [("mm", "m1"), ("mm", "m2"), ("cm", "m1"), ("cm", "m2")])
def test_builds_trains_hints_then_kd(config, target):
    data = synthetic_dataset(N)
    method = _method(config, target, data=data)
    guided = {"mm_m1": {"conv3", "fc1"}, "mm_m2": {"conv2", "conv3"}, "cm_m1": {"conv1"}, "cm_m2": {"conv2"}}
    assert {name.split(".")[1] for name in method.guided} == guided[f"{config}_{target}"]
    context = _context(data)
    assert [phase.name for phase in method.phases(context)] == ["hint", "main"]
    before = copy.deepcopy(method.student.state_dict())
    logged = []
    _hint(method, context, log=lambda phase, epoch, metrics: logged.append((phase, epoch, metrics)))
    assert [(phase, epoch) for phase, epoch, _ in logged] == [("hint", 0)]
    assert set(logged[0][2]) == {"train_hint", "train_loss", "val_hint", "best_epoch"}
    after = method.student.state_dict()
    for name in before:  # Q4: only the hinted layers move in the hint phase
        moved = not torch.equal(before[name], after[name])
        assert moved == (name in method.guided), name
    assert method.regressors is None
    optimizer = method.configure_optimizer(1e-3)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in method.student.parameters()}
    assert all(p.requires_grad for p in method.student.parameters())
    batch = data.batch(synthetic_split(N)["train"][:8])  # cached teacher logits exist for train and val only
    for _ in range(2):
        terms = method.loss_terms(batch, 0)
        assert set(terms) == {"ce", "kd"}
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)


def test_no_hint_phase_without_hint_epochs():
    data = synthetic_dataset(N)
    method = _method("cm", "m2", _params(hint_epochs={"av_digits": 0}), data=data)
    assert [phase.name for phase in method.phases(_context(data))] == ["main"]
    assert method.regressors is None


def test_trunk_scope_trains_everything_up_to_the_last_tap():
    student = role_network("m1")
    sample = synthetic_dataset(N).batch(torch.arange(2))
    names = trunk_parameter_names(student, ["conv1", "flatten_identity"], sample)
    assert names == {f"body.{m}.{p}" for m in ("conv1", "conv2", "conv3") for p in ("weight", "bias")}
    method = _method("cm", "m1", _params(hint_scope="trunk"))
    assert method.guided == names


def test_the_best_validation_hint_state_is_reloaded():
    data = synthetic_dataset(N)
    method = _method("cm", "m2", _params(hint_epochs={"av_digits": 4}, hint_lr=0.05), data=data)
    snapshots = []
    result = _hint(method, _context(data), log=lambda phase, epoch, m: snapshots.append(
        (m["val_hint"], copy.deepcopy(method.student.state_dict()))))
    assert len(snapshots) == 4
    best = min(range(4), key=lambda i: snapshots[i][0])
    assert result.best_epoch == best
    final = method.student.state_dict()
    assert all(torch.equal(final[k], v) for k, v in snapshots[best][1].items())


def test_validation_score_is_the_alpha_weighted_kd_objective():
    data = synthetic_dataset(N)
    method = _method("mm", "m1", _params(hint_epochs={"av_digits": 0}), data=data)
    context = _context(data)
    method.prepare(context)
    epoch = 31  # α = 0.25
    expected = []
    method.student.eval()
    with torch.no_grad():
        for batch in data.batches(context.split["val"], context.batch_size):
            logits, teacher = method.student(batch), method.teacher(batch)
            expected.append(0.75 * F.cross_entropy(logits, batch["y"]).item()
                            + 0.25 * hinton_kd_loss(logits, teacher, 4.0).item())
    method.student.train()
    assert method.validation_score(context, epoch) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert method.student.training
    ce_method = _method("mm", "m1", _params(hint_epochs={"av_digits": 0}, selection="ce"), data=data)
    ce_method.prepare(context)
    assert ce_method.validation_score(context, 0) is None


def test_train_runs_the_hint_then_the_main_phase_with_the_teacher_frozen():
    data = synthetic_dataset(N)
    method = _method("cm", "m1", data=data)
    before = copy.deepcopy(method.teacher.state_dict())
    result = train(method, run_context(data, synthetic_split(N), epochs=1, batch_size=16, lr=1e-2))
    assert [(p.name, p.epochs, len(p.history)) for p in result.phases] == [("hint", 1, 1), ("main", 1, 1)]
    assert {"train_hint", "val_hint"} <= set(result.phases[0].history[0])
    assert {"train_ce", "train_kd", "val_loss", "val_selection_score", "alpha"} <= set(result.final.history[0])
    assert method.regressors is None and set(result.test) == {"student"}
    assert not method.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in method.teacher.state_dict().items())


def test_cached_teacher_taps_and_logits_give_the_same_training():
    data = synthetic_dataset(N)
    methods = []
    for cache in (True, False):
        method = _method("mm", "m2", cache=cache, data=data)
        _hint(method, _context(data))
        methods.append(method)
    cached, fresh = methods
    for key, value in cached.student.state_dict().items():
        torch.testing.assert_close(value, fresh.student.state_dict()[key], rtol=1e-5, atol=1e-6)
    batch = data.batch(synthetic_split(N)["train"][:8])
    for name, value in cached.loss_terms(batch, 0).items():
        torch.testing.assert_close(value, fresh.loss_terms(batch, 0)[name], rtol=1e-5, atol=1e-6)


def test_configuration_errors_are_clear():
    params = _params()
    pairs = params.taps["three_layer_cnn_a"]["lenet5"]
    bad_pairs = [dataclasses.replace(pairs[0], student="conv9"), pairs[1]]
    bad_tap = dataclasses.replace(params, taps={**params.taps, "three_layer_cnn_a": {"lenet5": bad_pairs}})
    with pytest.raises(KeyError, match="conv9"):  # an unchecked block reaching the method
        _method("cm", "m1", bad_tap)
    with pytest.raises(KeyError, match="fitnets.taps.cnn_i.lenet5 is missing"):
        _method("mm", "m1", dataclasses.replace(params, taps={}))
    with pytest.raises(KeyError, match="fitnets.taps.lenet5.three_layer_cnn_a is missing"):
        _method("cm", "m2", dataclasses.replace(params, taps={"cnn_i": params.taps["cnn_i"]}))
    with pytest.raises(KeyError, match="fitnets.hint_epochs.av_digits is missing"):
        _method("mm", "m1", dataclasses.replace(params, hint_epochs={"av_mnist": 3}))
    with pytest.raises(ValueError, match="mm\\+cm"):
        check_teacher_config(FitNets, "mm+cm")
    check_teacher_config(FitNets, "mm")
    check_teacher_config(FitNets, "cm")
