"""Distillation methods, one module (or package) and one registered class each; the class's `name` is the
module's name (`kd` is kd.py, `mst` is the mst/ package). See common/base.py for the contract.

Methods are found by listing this package, and a method's module is imported only when it is asked for,
so a stage imports the methods it runs and nothing else (its DVC deps stay short and exact). Adding a
method is adding its module: nothing here changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from pipeline.methods.common.base import (METHODS, DistillationMethod, MethodSetup,  # noqa: F401
                                          check_teacher_config)

_NOT_METHODS = {"common"}


def method_names() -> list[str]:
    """Every method's name, without importing any method (module names of this package)."""
    return sorted(info.name for info in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if info.name not in _NOT_METHODS)


def method_class(name: str) -> type[DistillationMethod]:
    """The registered class of method `name`, importing its module on first use."""
    if name not in METHODS:
        if name not in method_names():
            raise KeyError(f"unknown method {name!r}; methods: {', '.join(method_names())}")
        importlib.import_module(f"pipeline.methods.{name}")
        if name not in METHODS:
            raise KeyError(f"pipeline/methods/{name} registers no method named {name!r}")
    return METHODS[name]


def all_methods() -> list[type[DistillationMethod]]:
    """Every method class, in the order of the paper's Table 1 (`table_order`)."""
    return sorted((method_class(name) for name in method_names()), key=lambda cls: (cls.table_order, cls.name))


def table_rows() -> list[tuple[str, str, str, str]]:
    """Table 1 rows from the registry, in the paper's order: (row key, label, method, teacher config)."""
    rows = []
    for cls in all_methods():
        if not cls.teacher_configs:
            rows.append(("wo_kd" if cls.name == "ce" else cls.name, cls.display_name, cls.name, "none"))
        for config in cls.teacher_configs:
            key = cls.name if config == "mm+cm" else f"{cls.name}_{config}"
            rows.append((key, f"{cls.display_name} ({config.upper()})", cls.name, config))
    return rows
