"""The contract every registered method meets, checked on each (method, teacher configuration, target) with
its real params block (shrunk): it builds through `from_setup`, trains every phase it declares through the
one engine (two optimiser steps per epoch on the CPU), leaves its frozen parts unchanged (weights and BN
buffers) and without gradients, and its cached frozen outputs equal recomputing them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.methods import all_methods
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.methods.mst.specialist_adaptation import SpecialistMasks
from pipeline.training.engine import train
from tests.conftest import method_setup, role_network, run_context, synthetic_dataset, synthetic_split

N = 40  # 24 training samples: two steps per epoch at batch 16


def _cases():
    cases = []
    for cls in all_methods():
        if cls.name == "mst":
            cases += [("mst", "mm+cm", "m1", "collaborative_init", "default")]
            cases += [("mst", "mm+cm", t, "specialist_adaptation", "default") for t in ("m1", "m2")]
            cases += [("mst", "mm+cm", t, "dynamic_distillation", s) for t in ("m1", "m2") for s in ("full", "c", "d")]
            continue
        for config in cls.teacher_configs or ("none",):
            cases += [(cls.name, config, target, None, "default") for target in ("m1", "m2")]
    return cases


CASES = _cases()


def _mst_restored(data, target: str, setting: str) -> dict:
    """Networks (and phase-2 MaskNets) as the earlier MST stages would hand them over."""
    from pipeline.methods.mst.method import MSTDistill
    from tests.conftest import method_block

    networks = {role: role_network(role) for role in ("mm", "m1", "m2")}
    restored = {"networks": networks}
    if setting in ("full", "d"):
        groups = MSTDistill.teacher_groups(method_block("mst"), networks, target, data.batch(torch.arange(2)),
                                           "av_digits")
        restored["masks"] = SpecialistMasks(groups)
    return restored


def _build(method: str, config: str, target: str, phase: str | None, setting: str, data, cache: bool = True):
    from pipeline.methods import method_class

    fields = {}
    if method == "mst":
        fields = {"phase": phase, "setting": setting, "student": None}
        if phase != "collaborative_init":
            fields["restored"] = _mst_restored(data, target, setting)
    setup = method_setup(method, config, target, data, cache=cache, **fields)
    return method_class(method).from_setup(setup)


def _frozen_state(method) -> list[tuple[torch.nn.Module, dict]]:
    return [(module, copy.deepcopy(module.state_dict())) for module in method._frozen]


@pytest.mark.parametrize("method, config, target, phase, setting", CASES,
                         ids=[f"{m}-{c}-{t}" + (f"-{p}-{s}" if p else "") for m, c, t, p, s in CASES])
def test_builds_trains_and_keeps_frozen_parts_frozen(method, config, target, phase, setting):
    torch.set_num_threads(1)
    data = synthetic_dataset(N)
    built = _build(method, config, target, phase, setting, data)
    frozen = _frozen_state(built)
    context = run_context(data, synthetic_split(N), epochs=1)
    declared = [p.name for p in _build(method, config, target, phase, setting, data).phases(context)]
    result = train(built, context)
    assert [p.name for p in result.phases] == declared  # every declared phase ran, in order
    assert all(math.isfinite(epoch["train_loss"]) for p in result.phases for epoch in p.history)
    assert all(len(p.history) == p.epochs for p in result.phases)
    for module, before in frozen:
        assert not module.training, type(module).__name__
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
        after = module.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), type(module).__name__  # BN buffers included
    trainable = list(built.trainable_parameters())
    assert trainable and not any(p is q for module, _ in frozen for p in trainable for q in module.parameters())
    for role, evaluation in result.test.items():
        assert 0.0 <= evaluation.accuracy <= 1.0 and evaluation.confusion.sum() == len(context.split["test"])


def _frozen_outputs(module) -> list[FrozenOutputs]:
    found = [v for v in vars(module).values() if isinstance(v, FrozenOutputs)]
    for child in module.children():
        found += [v for v in vars(child).values() if isinstance(v, FrozenOutputs)]
    return found


@pytest.mark.parametrize("method, config, target, phase, setting",
                         [c for c in CASES if c[0] in ("kd", "mlld", "fitnets", "ofa", "rkd", "crd")
                          and c[2] == "m2"] + [c for c in CASES if c[3] == "dynamic_distillation" and c[2] == "m1"],
                         ids=lambda v: str(v))
def test_cached_frozen_outputs_equal_recomputed_ones(method, config, target, phase, setting):
    torch.set_num_threads(1)
    data = synthetic_dataset(N)
    built = _build(method, config, target, phase, setting, data)
    context = run_context(data, synthetic_split(N), epochs=1)
    built.to(context.device)
    for p in built.phases(context):  # prepare every phase's caches as the engine would
        if p.before is not None:
            p.before()
    caches = [fo for fo in _frozen_outputs(built) if fo.enabled and fo._table is not None]
    assert caches, "the method caches nothing"
    batch = data.batch(context.split["train"][:8])
    for cache in caches:
        torch.testing.assert_close(cache(batch), cache._compute(batch), rtol=1e-5, atol=1e-6)
