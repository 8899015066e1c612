"""Distillation methods, one file and one registered class each (see base.py for the contract)."""

from pipeline.methods import ce, kd  # noqa: F401  (importing registers the methods)
from pipeline.methods.base import METHODS, DistillationMethod, method_class, register  # noqa: F401
