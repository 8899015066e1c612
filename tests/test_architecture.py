"""The shape of the code: imports inside pipeline/ point one way (no cycles, no layer importing a higher
one, methods never import the engine), and every DVC stage's deps cover every in-repo module its entry
point can import, so `dvc repro` cannot reuse results computed by other code.

Imports are read from the source (ast), function-level ones included. Method modules are imported on
demand (pipeline.methods.method_class), which ast cannot follow, so a stage's method modules are derived
the way the code picks them: the `--method` of its command, the method blocks its params list (config.py
parses exactly those), and every method for a stage that builds Table 1 (the registry's rows).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

# Lower index = lower layer; a module may import its own layer or lower ones only.
LAYERS = [
    ("pipeline.errors", "pipeline.io", "pipeline.params"),
    ("pipeline.data", "pipeline.models", "pipeline.tracking", "pipeline.reporting.figures"),
    ("pipeline.training", "pipeline.extraction"),
    ("pipeline.methods",),
    ("pipeline.orchestration", "pipeline.reporting.tables"),
]
# Modules that cannot change a stage's outputs (they only log to MLflow): need not be DVC deps.
OUTPUT_NEUTRAL = ("pipeline/tracking/",)


def module_path(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def direct_imports(name: str) -> frozenset[str]:
    """In-repo modules imported anywhere in module `name` (function-level imports included)."""
    path = module_path(name)
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if module_path(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in ("pipeline", "stages") and module_path(t))
    return frozenset(found)


def pipeline_modules() -> list[str]:
    return sorted(module_name(p) for p in (REPO / "pipeline").rglob("*.py"))


def layer_of(name: str) -> int | None:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One import cycle of `graph`, as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_inside_pipeline():
    graph = {name: frozenset(i for i in direct_imports(name) if i.startswith("pipeline"))
             for name in pipeline_modules()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"})}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset()}) is None


def test_layers_import_downwards_only():
    violations = []
    for name in pipeline_modules():
        own = layer_of(name)
        if own is None:
            continue
        for target in direct_imports(name):
            other = layer_of(target)
            if other is not None and other > own:
                violations.append(f"{name} (layer {own}) imports {target} (layer {other})")
    assert not violations, "\n".join(violations)


def test_methods_never_import_the_engine():
    offenders = [name for name in pipeline_modules() if name.startswith("pipeline.methods")
                 and any(t.startswith("pipeline.training.engine") for t in direct_imports(name))]
    assert not offenders, offenders


def test_stage_scripts_only_call_the_library():
    """Thin stage scripts: no loops over runs and no model choices; everything they import is pipeline/ or
    stages/common."""
    for path in (REPO / "stages").glob("*.py"):
        imports = direct_imports(module_name(path))
        assert all(i.startswith("pipeline") or i == "stages.common" for i in imports), (path, imports)


# ---- DVC deps ----

def _stages() -> list[tuple[str, dict]]:
    """Every resolved stage of dvc.yaml: (name, {"cmd", "deps", "params"}), foreach/matrix expanded with the
    values in params.yaml (the way DVC expands them)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def substitute(text, variables):
        def value(match):
            expr = match.group(1)
            if expr in variables:
                return str(variables[expr])
            node = params
            for part in expr.split("."):
                node = node[part]
            return str(node)
        return re.sub(r"\$\{([^}]+)\}", value, text) if isinstance(text, str) else text

    def resolve(body, variables):
        deps = [substitute(d, variables) for d in body.get("deps", [])]
        keys = []
        for entry in body.get("params", []):
            keys.extend(entry if isinstance(entry, list) else [substitute(entry, variables)])
        return {"cmd": substitute(body["cmd"], variables), "deps": deps, "params": keys}

    def lookup(dotted: str):
        value = params
        for part in dotted.strip("${}").split("."):
            value = value[part]
        return value

    out = []
    for name, body in dvc["stages"].items():
        if "foreach" in body:
            items = lookup(body["foreach"])
            if isinstance(items, list):            # e.g. studies: DVC names list stages by item
                items = {item: item for item in items}
            if name == "extract" and not items:    # none by default: check every extraction stage anyway
                from pipeline.extraction.settings import EXTRACTORS
                items = {key: f"data/raw/{key}" for key in EXTRACTORS}
            for key, item in items.items():
                out.append((f"{name}@{key}", resolve(body["do"], {"key": key, "item": item})))
        elif "matrix" in body:
            axes = {axis: lookup(values) if isinstance(values, str) else values
                    for axis, values in body["matrix"].items()}
            combos = [{}]
            for axis, values in axes.items():
                values = list(values) if isinstance(values, dict) else values
                combos = [{**c, f"item.{axis}": v} for c in combos for v in values]
            for combo in combos:
                out.append((f"{name}@" + "-".join(str(v) for v in combo.values()), resolve(body, combo)))
        else:
            out.append((name, resolve(body, {})))
    return out


def stage_modules(stage: dict) -> set[str]:
    """Every in-repo module the stage's entry point can import (its closure), method modules included."""
    entry = re.search(r"python -m (\S+)", stage["cmd"]).group(1)
    start = {entry}
    method = re.search(r"--method (\S+)", stage["cmd"])
    from pipeline.methods import method_names
    names = set(method_names())
    if method:
        start.add(f"pipeline.methods.{method.group(1)}")
    start |= {f"pipeline.methods.{key.split('.')[0]}" for key in stage["params"] if key.split(".")[0] in names}
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(direct_imports(name))
        if name == "pipeline.reporting.tables":  # Table 1 rows come from every registered method
            todo.extend(f"pipeline.methods.{n}" for n in names)
    return seen


def _is_trivial(path: Path) -> bool:
    """A package __init__ holding nothing but a docstring cannot change anything."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                              for n in body)


def uncovered(stage: dict) -> list[str]:
    deps = [d.rstrip("/") for d in stage["deps"]]
    missing = []
    for name in sorted(stage_modules(stage)):
        path = module_path(name)
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(OUTPUT_NEUTRAL) or _is_trivial(path):
            continue
        if not any(rel == d or rel.startswith(d + "/") for d in deps):
            missing.append(rel)
    return missing


STAGES = _stages()


@pytest.mark.parametrize("name, stage", STAGES, ids=[name for name, _ in STAGES])
def test_stage_deps_cover_every_module_it_imports(name, stage):
    assert not uncovered(stage), f"{name}: dvc.yaml deps do not cover {uncovered(stage)}"


def test_a_removed_dep_is_detected():
    name, stage = next((n, s) for n, s in STAGES if n.startswith("distill@") and n.endswith("-kd"))
    assert not uncovered(stage)
    broken = {**stage, "deps": [d for d in stage["deps"] if d != "pipeline/methods/kd.py"]}
    assert uncovered(broken) == ["pipeline/methods/kd.py"]


def test_every_stage_is_resolved():
    names = [name for name, _ in STAGES]
    assert {"build_av_digits", "prepare@av_digits", "teachers@av_digits", "distill@av_digits-kd", "mst_s1@av_digits",
            "mst_s3@av_digits", "mst_topk_sweep@av_digits", "report"} <= set(names)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert sum(n.startswith("distill@") for n in names) == len(params["datasets"]) * len(params["methods"])
