"""A generic, strict parser from YAML values into frozen dataclasses (the bottom layer: imports nothing
from the pipeline).

Each params block is a dataclass that declares its own keys, types and allowed values (field metadata
made with :func:`check`) and may add cross-field rules in a `validate(self)` method that raises
:class:`BlockError`. An unknown or misspelled key, a wrong type or an impossible value raises
:class:`ParamsError` naming the full key path (and a close spelling when there is one), so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from pipeline.errors import UserError


class ParamsError(UserError):
    """params.yaml is invalid; the message names the key and what was expected."""


class BlockError(ValueError):
    """Raised by a block's `validate()`: `key` is relative to the block ("" for the block itself)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def check(predicate, expectation: str) -> dict:
    """Field metadata: the parsed value must satisfy `predicate`, else 'expected <expectation>'."""
    return {"check": (predicate, expectation)}


POSITIVE = check(lambda v: v > 0, "a number > 0")
NON_NEGATIVE = check(lambda v: v >= 0, "a number >= 0")
FRACTION = check(lambda v: 0 < v < 1, "a number strictly between 0 and 1")
PROBABILITY = check(lambda v: 0 <= v <= 1, "a number between 0 and 1")


def each_value(predicate, expectation: str) -> dict:
    """Field metadata for a mapping whose every value must satisfy `predicate`."""
    return check(lambda mapping: all(predicate(v) for v in mapping.values()), expectation)


# YAML 1.1 (PyYAML) reads 1e-4 as a string: a float needs a dot in the mantissa (1.0e-4)
_FLOAT_LIKE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def read_yaml(path: Path | str) -> dict:
    """The top-level mapping of a YAML params file; ParamsError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        raise ParamsError(f"{path}: the parameters file is empty; expected a mapping of top-level keys "
                          "(restore it with `git checkout params.yaml`)")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: <top level>: expected a mapping of top-level keys, got {raw!r}")
    return raw


def fail(source: str, key: str, message: str) -> ParamsError:
    return ParamsError(f"{source}: {key or '<top level>'}: {message}")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def parse(tp: Any, value: Any, key: str, source: str, extra_known: typing.Sequence[str] = ()) -> Any:
    """`value` (from YAML) parsed as type `tp`; ParamsError naming `key` when it does not fit.
    `extra_known`: other valid keys at this level (for spelling suggestions only)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, key, source, extra_known)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise fail(source, key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise fail(source, key, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [parse(item_tp, item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(source, key, f"expected a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {str(k): parse(value_tp, v, join(key, str(k)), source) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported params type {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LIKE.fullmatch(value.strip()):
            raise fail(source, key, f"expected a number, got the string {value!r}: YAML reads exponent notation "
                                    f"without a dot as text; write {_as_yaml_float(value)} instead")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(source, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise fail(source, key, f"expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {tp}")


def _as_yaml_float(text: str) -> str:
    mantissa, _, exponent = text.strip().lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def _parse_dataclass(tp: Any, value: Any, key: str, source: str, extra_known: typing.Sequence[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(tp) if f.init and not f.metadata.get("parsed_separately")}
    if not isinstance(value, dict):
        raise fail(source, key, f"expected a mapping of {', '.join(fields)}, got {value!r}")
    hints = typing.get_type_hints(tp)
    unknown = [name for name in value if name not in fields]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(str(name), [*fields, *extra_known], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed keys: {', '.join(fields)}"
        raise fail(source, join(key, name), f"unknown key{hint}")
    missing = [name for name, f in fields.items() if name not in value
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise fail(source, join(key, missing[0]), "missing required key")
    parsed = {}
    for name, spec in fields.items():
        if name not in value:
            continue
        sub = join(key, name)
        parsed[name] = parse(hints[name], value[name], sub, source)
        rule = spec.metadata.get("check")
        if rule and not rule[0](parsed[name]):
            raise fail(source, sub, f"expected {rule[1]}, got {value[name]!r}")
    block = tp(**parsed)
    validate = getattr(block, "validate", None)
    if callable(validate):
        try:
            validate()
        except BlockError as err:
            raise fail(source, join(key, err.key), err.message) from None
    return block


def flatten(block: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) params dataclass or mapping as {"a.b": value}."""
    if dataclasses.is_dataclass(block):
        items = ((f.name, getattr(block, f.name)) for f in dataclasses.fields(block))
    else:
        items = dict(block).items()
    out: dict[str, Any] = {}
    for name, value in items:
        if isinstance(value, _Unlisted):  # not an input of this stage (see restrict_to): not logged either
            continue
        full = f"{prefix}{name}"
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            out.update(flatten(value, f"{full}."))
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            out[full] = [dataclasses.asdict(v) for v in value]
        else:
            out[full] = value
    return out


def load_blocks(path: Path | str, types: dict[str, Any], *, restrict: bool = True) -> dict[str, Any]:
    """Only the blocks `types` ({top-level key: params type}) of a params file, parsed and checked (for the
    stages that read one or two blocks; the full file is checked by pipeline/orchestration/config.py).
    Under a DVC stage the result is restricted to the keys the stage lists (see `restrict_to`)."""
    raw = read_yaml(path)
    blocks = {}
    for key, tp in types.items():
        if key not in raw:
            raise fail(str(path), key, "missing required key")
        blocks[key] = parse(tp, raw[key], key, str(path))
    stage = os.environ.get("DVC_STAGE")
    if restrict and stage:
        blocks = restrict_to(blocks, listed_params(stage), stage)
    return blocks


# ---- restriction to the keys a DVC stage lists ----

# Keys that never change a stage's outputs: readable by every stage without being listed in dvc.yaml.
OUTPUT_NEUTRAL_KEYS = ("workers", "executor", "tracking")

class UnlistedParamError(ParamsError):
    """A stage read a params key its dvc.yaml entry does not list."""


@dataclass(frozen=True)
class _Unlisted:
    key: str
    stage: str

    def fail(self):
        raise UnlistedParamError(f"params.yaml: {self.key}: stage {self.stage!r} reads this key but dvc.yaml does "
                                 f"not list it under the stage's params; add it there (otherwise `dvc repro` could "
                                 f"reuse results computed with another value)")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self.fail()

    __hash__ = None  # type: ignore[assignment]


def _fail_on_use(self, *args, **kwargs):
    self.fail()


# any use of an unlisted value (indexing, iteration, truth, comparison, printing, arithmetic, conversion,
# call) names the key
for _name in ("getitem", "iter", "len", "bool", "eq", "ne", "str", "format", "add", "radd", "sub", "rsub", "mul",
              "rmul", "truediv", "rtruediv", "floordiv", "rfloordiv", "pow", "rpow", "mod", "lt", "le", "gt", "ge",
              "neg", "pos", "abs", "float", "int", "index", "contains", "call", "round"):
    setattr(_Unlisted, f"__{_name}__", _fail_on_use)


class _ListedMapping(dict):
    """A mapping of which only some keys are listed; reading another names it."""

    def __init__(self, items: dict, prefix: str, stage: str) -> None:
        super().__init__(items)
        self._prefix, self._stage = prefix, stage

    def __missing__(self, key):
        _Unlisted(join(self._prefix, str(key)), self._stage).fail()


def listed_params(stage: str) -> list[str]:
    """The params keys `stage`'s dvc.yaml entry lists (resolved by DVC itself)."""
    from dvc.repo import Repo

    repo = Repo(os.getcwd())
    try:
        (resolved,) = repo.stage.collect(stage)
    finally:
        repo.close()
    return [key for dep in resolved.deps if hasattr(dep, "params") for key in (dep.params or [])]


def restrict_to(params: Any, keys: list[str], stage: str) -> Any:
    """A copy of `params` (a params dataclass or a mapping of blocks) in which only `keys` (and
    OUTPUT_NEUTRAL_KEYS) can be read; reading any other key raises UnlistedParamError naming it."""
    allowed = set(keys) | set(OUTPUT_NEUTRAL_KEYS)
    return _restrict(params, "", allowed, stage)


def _restrict(value: Any, prefix: str, allowed: set[str], stage: str) -> Any:
    if prefix in allowed:
        return value
    if prefix and not any(key.startswith(prefix + ".") for key in allowed):
        return _Unlisted(prefix, stage)
    if dataclasses.is_dataclass(value):
        # a field marked `top_level_keys` holds blocks whose keys are top-level keys (the method blocks)
        return dataclasses.replace(value, **{
            f.name: _restrict(getattr(value, f.name), "" if f.metadata.get("top_level_keys") else join(prefix, f.name),
                              allowed, stage)
            for f in dataclasses.fields(value) if f.init})
    if isinstance(value, dict):
        def listed(key: str) -> bool:
            full = join(prefix, key)
            return full in allowed or any(a.startswith(full + ".") for a in allowed)

        return _ListedMapping({k: _restrict(v, join(prefix, k), allowed, stage) for k, v in value.items() if listed(k)},
                              prefix, stage)
    return _Unlisted(prefix, stage)
