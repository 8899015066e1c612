"""Distillation methods, one file and one registered class each (see base.py for the contract)."""

# importing a method's module registers it
from pipeline.methods import c2kd, ce, crd, dml, fitnets, kd, mgdfr, mlld, ofa, rkd  # noqa: F401
from pipeline.methods.base import METHODS, DistillationMethod, method_class, register  # noqa: F401
