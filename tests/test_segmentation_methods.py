"""Every Table 2 method and MST-Distill's three phases run on FuseNet through params alone: each (method,
teacher configuration, target) is built from the real params.yaml (taps and hooks keyed by the FuseNet
architecture pair) the way the pipeline builds it and takes optimiser steps on a tiny synthetic RGB-D batch
(32×32, 1/16 of FuseNet's width, void pixels included); the methods the paper could not apply to
segmentation are refused before any work."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pipeline.data.catalog import dataset_spec
from pipeline.data.tensors import IGNORE, DeviceDataset
from pipeline.methods import all_methods, method_class
from pipeline.methods.mst.gate_net import DenseGateNet
from pipeline.methods.mst.mask_net import MaskNet1d, MaskNet2d
from pipeline.methods.mst.method import MSTDistill
from pipeline.orchestration.runs import LoadedDataset, check_applicable, make_setup
from pipeline.params import ParamsError
from pipeline.training.engine import train
from pipeline.training.phases import RunContext
from tests.conftest import shrunk_raw

KEY = "rgbd_digits"
N = 10   # 6 training images: two steps of 3


def _params():
    from pipeline.orchestration.config import parse_params

    raw = shrunk_raw(epochs=1)
    for block in ("training", "teacher_training"):
        raw[block][KEY].update(epochs=1, batch_size=3)
    return parse_params(raw)


PARAMS = _params()


def _loaded() -> LoadedDataset:
    spec = dataset_spec(KEY)
    rng = np.random.default_rng(0)
    rgb, depth = rng.random((N, 3, 32, 32), dtype=np.float32), rng.random((N, 1, 32, 32), dtype=np.float32)
    labels = rng.integers(0, spec.num_classes, size=(N, 32, 32)).astype(np.int64)   # void (0) included
    data = DeviceDataset.from_arrays({"m1": rgb, "m2": depth, "labels": labels}, torch.device("cpu"),
                                     ignore_label=spec.ignore_label)
    index = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    return LoadedDataset(spec, data, {0: {"train": index[:6], "val": index[6:8], "test": index[8:]}},
                         PARAMS.fusenet.options(KEY))


LOADED = _loaded()


def _cases():
    cases = []
    for cls in all_methods():
        if not cls.segmentation:
            continue
        if cls.name == "mst":
            cases += [("mst", "mm+cm", target) for target in ("m1", "m2")]
            continue
        block = PARAMS.method(cls.name)
        for config in getattr(block, "teachers", None) or cls.teacher_configs or ("none",):
            cases += [(cls.name, config, target) for target in ("m1", "m2")]
    return cases


def _context() -> RunContext:
    cfg = PARAMS.training[KEY]
    return RunContext(LOADED.data, LOADED.splits[0], cfg.batch_size, 1, cfg.lr, LOADED.spec.num_classes,
                      torch.Generator().manual_seed(0), eval_batch_size=cfg.batch_size)


def _trained(method):
    result = train(method, _context())
    assert all(math.isfinite(epoch["train_loss"]) for phase in result.phases for epoch in phase.history)
    return result


def test_void_labels_are_ignored_in_the_synthetic_batch():
    assert (LOADED.data.y == IGNORE).any() and LOADED.data.y.shape == (N, 32, 32)


@pytest.mark.parametrize("method, config, target", _cases(), ids=lambda v: str(v))
def test_table2_method_runs_on_fusenet_through_params(method, config, target):
    torch.manual_seed(0)
    if method == "mst":
        _mst_three_phases(target)
        return
    role = "mm" if config == "mm" else LOADED.spec.other(target) if config == "cm" else None
    setup = make_setup(LOADED, PARAMS, 0, method=method, target=target, teacher_config=config,
                       student=LOADED.role_network(target), teacher=LOADED.role_network(role) if role else None)
    built = method_class(method).from_setup(setup)
    before = {k: v.clone() for k, v in built.student.state_dict().items()}
    result = _trained(built)
    assert result.phases and set(result.test) == {"student"}
    evaluation = result.test["student"]
    assert set(evaluation.metrics) == {"oa", "aa", "miou"} and 0 <= evaluation.metrics["oa"] <= 1
    changed = [k for k, v in built.student.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert changed, "the student took no optimiser step"


def _mst_three_phases(target: str) -> None:
    """Phase 1 trains FuseNet-I and both branches, phase 2 MaskNet_2d on every teacher's two hooked maps, phase
    3 the student with the dense GateNet routing each image over the N = 4 specialised teachers."""
    block = PARAMS.method("mst").with_topk(PARAMS.topk)
    common = dict(method="mst", target=target, teacher_config="mm+cm", student=None, method_params=block)
    first = MSTDistill.from_setup(make_setup(LOADED, PARAMS, 0, phase="collaborative_init", **common))
    _trained(first)
    networks = first.checkpoints()
    second = MSTDistill.from_setup(make_setup(LOADED, PARAMS, 0, phase="specialist_adaptation",
                                              restored={"networks": copy.deepcopy(networks)}, **common))
    _trained(second)
    masks = second.checkpoints()["masks"]
    aux = {"m1": ["CBR5_DEPTH_ENC", "CBR5_D_DEC"], "m2": ["CBR5_RGB_ENC", "CBR5_RGB_DEC"]}[target]
    assert masks.checkpoint_meta["mm"] == ["after_fusion_identity", "CBR5_RGBD_DEC"]
    assert masks.checkpoint_meta["cm"] == aux
    kinds = {group.name: [type(m) for m in group.masks] for group in second.groups}
    # 32-pixel inputs: the fused bottleneck is 1x1, so the authors' rule gives it a MaskNet_1d (spec §4.1)
    assert kinds["mm"] == [MaskNet1d, MaskNet2d] and kinds["cm"] == [MaskNet2d, MaskNet2d]
    third = MSTDistill.from_setup(make_setup(LOADED, PARAMS, 0, phase="dynamic_distillation", setting="full",
                                             restored={"networks": copy.deepcopy(networks), "masks": masks},
                                             **common))
    assert isinstance(third.objective.gate, DenseGateNet)
    result = _trained(third)
    routing = third.run_extras(result)["routing"]
    assert np.asarray(routing).shape[1] == block.n_specialists
    assert set(result.test["student"].metrics) == {"oa", "aa", "miou"}


@pytest.mark.parametrize("method", ["mlld", "ofa", "rkd", "crd"])
def test_methods_without_a_table2_row_are_refused_before_any_work(method):
    with pytest.raises(ParamsError, match=f"{method} cannot run on rgbd_digits"):
        check_applicable(method, LOADED.spec)


def test_params_refuse_a_segmentation_method_list_with_mlld_and_a_segmentation_dataset_in_table1():
    from pipeline.orchestration.config import parse_params

    raw = shrunk_raw()
    raw["segmentation"]["methods"] = ["kd", "mlld"]
    with pytest.raises(ParamsError, match=r"segmentation.methods\[1\]: mlld cannot run on semantic segmentation"):
        parse_params(raw)
    raw = shrunk_raw()
    raw["datasets"]["rgbd_digits"] = "data/rgbd_digits"
    with pytest.raises(ParamsError, match="rgbd_digits is a segmentation dataset; list it under segmentation"):
        parse_params(raw)
