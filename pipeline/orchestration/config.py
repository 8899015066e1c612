"""The benchmark's parameters: params.yaml parsed into typed blocks before any work starts.

Each block is declared where it is used and validates itself (pipeline/params.py is the generic
parser): `av_digits` in data/av_digits.py, `splits` in data/splits.py, `training`, `teacher_training` and
`engine` in training/settings.py, `tracking` in tracking/base.py, and every registered method's block
(top-level key = method name) next to the method. This module adds the rules that span blocks.

Under DVC (`DVC_STAGE` set) the parameters a stage receives are restricted to the keys its dvc.yaml
entry lists (pipeline/params.py, `restrict_to`): reading any other key stops the stage with one line
naming the key, so a stage's params list cannot silently go stale (an unlisted key would let `dvc repro`
reuse results computed with another value).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.data.av_digits import AVDigitsRecipe
from pipeline.data.catalog import DATASETS, SegmentationParams
from pipeline.data.rgbd_digits import RGBDDigitsRecipe
from pipeline.data.splits import SplitParams
from pipeline.extraction.settings import EXTRACTORS, ExtractionParams, extracted_folder
from pipeline.methods import check_teacher_config, method_class, method_names
from pipeline.models.settings import FuseNetParams
from pipeline.orchestration.executors import ExecutorParams
from pipeline.params import (NON_NEGATIVE, POSITIVE, BlockError, UnlistedParamError, fail, listed_params,
                             parse, read_yaml, restrict_to)
from pipeline.tracking.base import TrackingParams
from pipeline.training.settings import EngineParams, TrainingParams

@dataclass(frozen=True)
class Params:
    """The whole params.yaml. `methods`: the baselines the distill stage matrix runs (each a registered
    method with its own block); `blocks`: the parsed blocks of the registered methods, by method name."""

    seeds: list[int]
    device: str
    deterministic: bool
    workers: int = field(metadata=NON_NEGATIVE)
    threads_per_run: int = field(metadata=POSITIVE)
    executor: ExecutorParams
    datasets: dict[str, str]
    studies: list[str]
    extract: dict[str, str]
    extraction: ExtractionParams
    methods: list[str]
    segmentation: SegmentationParams
    av_digits: AVDigitsRecipe
    rgbd_digits: RGBDDigitsRecipe
    fusenet: FuseNetParams
    splits: SplitParams
    training: dict[str, TrainingParams]
    teacher_training: dict[str, TrainingParams]
    engine: EngineParams
    topk: int = field(metadata=POSITIVE)
    fidelity: Literal["paper", "official"]
    tracking: TrackingParams
    blocks: dict[str, Any] = field(default_factory=dict, metadata={"parsed_separately": True, "top_level_keys": True})

    def method(self, name: str) -> Any:
        """The params block of method `name`, resolved (MST: under `fidelity`); None for a method without one."""
        cls = method_class(name)
        if cls.params_type is None:
            return None
        block = self.blocks.get(name)
        if block is None:
            raise UnlistedParamError(f"params.yaml: {name}: this block was not loaded (a DVC stage gets the "
                                     f"method blocks its dvc.yaml entry lists)")
        resolve = getattr(cls, "resolve_params", None)
        return resolve(block, self) if resolve is not None else block


def load_params(path: Path | str = "params.yaml", *, restrict: bool = True) -> Params:
    """Read and validate params.yaml; ParamsError naming the offending key. Outside DVC every method block
    is parsed (importing every method); under a DVC stage (and with `restrict`) only the method blocks the
    stage lists are, and the result only exposes the keys the stage lists."""
    raw = read_yaml(path)
    stage = os.environ.get("DVC_STAGE") if restrict else None
    listed = listed_params(stage) if stage else None
    names = method_names() if listed is None else sorted({key.split(".")[0] for key in listed} & set(method_names()))
    params = parse_params(raw, source=str(path), parse_methods=names)
    if listed is not None:
        params = restrict_to(params, listed, stage)
    return params


def parse_params(raw: Any, source: str = "params.yaml", parse_methods: list[str] | None = None) -> Params:
    """Parse and cross-check the core blocks and the method blocks `parse_methods` (default: every method)."""
    if not isinstance(raw, dict):
        raise fail(source, "", f"expected a mapping of top-level keys, got {raw!r}")
    raw = dict(raw)
    names = method_names()
    method_raw = {name: raw.pop(name) for name in names if name in raw}
    blocks = {}
    for name in names if parse_methods is None else parse_methods:
        cls = method_class(name)
        if cls.params_type is None:
            continue
        if name not in method_raw:
            raise fail(source, name, f"missing required key (the params of method {name!r})")
        block = parse(cls.params_type, method_raw[name], name, source)
        for i, config in enumerate(getattr(block, "teachers", [])):
            try:
                check_teacher_config(cls, config)
            except ValueError as err:
                raise fail(source, f"{name}.teachers[{i}]", str(err)) from None
        blocks[name] = block
    params = parse(Params, raw, "", source, extra_known=names)
    params = dataclasses.replace(params, blocks=blocks)
    _cross_checks(params, source)
    return params


def _cross_checks(p: Params, source: str) -> None:
    if not p.seeds:
        raise fail(source, "seeds", "expected at least one seed")
    if len(set(p.seeds)) != len(p.seeds):
        raise fail(source, "seeds", f"seeds must be distinct, got {p.seeds}")
    for i, seed in enumerate(p.seeds):
        if not 0 <= seed < p.splits.permutations:
            raise fail(source, f"seeds[{i}]", f"seed {seed} selects split column group_{seed}, but "
                                              f"splits.permutations is {p.splits.permutations}; expected 0.."
                                              f"{p.splits.permutations - 1}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", p.device):
        raise fail(source, "device", f"expected auto, cpu, cuda or cuda:N, got {p.device!r}")
    if not p.datasets:
        raise fail(source, "datasets", "expected at least one enabled dataset")
    for block, names, task in (("datasets", p.datasets, "classification"),
                               ("segmentation.datasets", p.segmentation.datasets, "segmentation")):
        for name in names:
            if name not in DATASETS:
                close = difflib.get_close_matches(name, DATASETS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise fail(source, f"{block}.{name}", f"unknown dataset{hint}; known: {', '.join(DATASETS)}")
            if DATASETS[name].task != task:
                home = "segmentation.datasets (Table 2)" if task == "classification" else "datasets (Table 1)"
                raise fail(source, f"{block}.{name}", f"{name} is a {DATASETS[name].task} dataset; list it under "
                                                      f"{home}")
    both = set(p.datasets) & set(p.segmentation.datasets)
    if both:
        raise fail(source, "segmentation.datasets", f"{', '.join(sorted(both))} also listed under datasets")
    for i, name in enumerate(p.studies):
        if name not in p.datasets:
            raise fail(source, f"studies[{i}]", f"{name!r} is not an enabled dataset; expected one of "
                                               f"{', '.join(p.datasets)}")
    if len(set(p.studies)) != len(p.studies):
        raise fail(source, "studies", f"studies must be distinct, got {p.studies}")
    for name, raw_dir in p.extract.items():
        if name not in EXTRACTORS:
            raise fail(source, f"extract.{name}", f"no extraction stage for this dataset; datasets extracted from "
                                                  f"raw files: {', '.join(EXTRACTORS)}")
        if name in p.datasets and p.datasets[name].rstrip("/") != extracted_folder(name):
            raise fail(source, f"datasets.{name}", f"reads {p.datasets[name]!r}, but extract.{name} writes "
                                                   f"{extracted_folder(name)!r}; point it there (or remove "
                                                   f"extract.{name} to read a prepared folder directly)")
    for i, name in enumerate(p.splits.disjoint_groups):
        spec = DATASETS.get(name)
        if spec is None or spec.groups is None:
            grouped = [k for k, s in DATASETS.items() if s.groups]
            raise fail(source, f"splits.disjoint_groups[{i}]", f"{name!r} has no sample groups to split by; "
                                                                f"datasets with groups: {', '.join(grouped)}")
    for block in ("training", "teacher_training"):
        for name in getattr(p, block):
            if name not in DATASETS:
                raise fail(source, f"{block}.{name}", f"unknown dataset; known: {', '.join(DATASETS)}")
        for name in [*p.datasets, *p.segmentation.datasets]:
            if name not in getattr(p, block):
                raise fail(source, f"{block}.{name}", f"missing: dataset {name!r} is enabled but has no {block} "
                                                      "block")
    runnable = [n for n in method_names() if n not in ("ce", "mst")]
    for i, name in enumerate(p.methods):
        if name not in runnable:
            close = difflib.get_close_matches(name, runnable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(source, f"methods[{i}]", f"{name!r} is not a baseline the distill stage runs{hint}; expected "
                                                f"one of {', '.join(runnable)} (MST-Distill has its own stages)")
    if len(set(p.methods)) != len(p.methods):
        raise fail(source, "methods", f"methods must be distinct, got {p.methods}")
    for i, name in enumerate(p.segmentation.methods):
        if name not in runnable:
            raise fail(source, f"segmentation.methods[{i}]", f"{name!r} is not a baseline the distill stage runs; "
                                                             f"expected one of {', '.join(runnable)}")
        if not method_class(name).segmentation:
            dense = [n for n in runnable if method_class(n).segmentation]
            raise fail(source, f"segmentation.methods[{i}]", f"{name} cannot run on semantic segmentation (the "
                                                             f"paper's Table 2 has no {method_class(name).display_name} "
                                                             f"row; baselines-spec Q7); expected some of "
                                                             f"{', '.join(dense)}")
    if len(set(p.segmentation.methods)) != len(p.segmentation.methods):
        raise fail(source, "segmentation.methods", f"methods must be distinct, got {p.segmentation.methods}")
    for name in p.segmentation.datasets:
        if name not in p.fusenet.width:
            raise fail(source, f"fusenet.width.{name}", f"missing: segmentation dataset {name!r} is enabled but its "
                                                        "FuseNets have no width")
    if "mst" in p.blocks:
        try:
            p.blocks["mst"].with_topk(p.topk)
        except BlockError as err:
            raise fail(source, "topk", err.message) from None
    for name, block in p.blocks.items():
        resolve = getattr(method_class(name), "resolve_params", None)
        if resolve is not None:
            resolve(block, p)
