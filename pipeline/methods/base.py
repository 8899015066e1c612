"""The contract every distillation method implements, and the method registry.

A method owns its math and its extra modules. The training engine asks it for a mapping of named
loss terms (weights already applied) and sums them; the method never logs, saves or prints.
Frozen teachers are registered with :meth:`DistillationMethod.freeze`, which keeps them in eval mode,
out of the optimiser and without gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.data.tensors import Batch, DeviceDataset
from pipeline.models.registry import Network

METHODS: dict[str, type["DistillationMethod"]] = {}


def register(cls: type["DistillationMethod"]) -> type["DistillationMethod"]:
    """Class decorator: make a method available under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type["DistillationMethod"]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


class DistillationMethod(nn.Module):
    """Base class: a student, optional teachers, and the loss the student is trained with."""

    name: ClassVar[str]
    teacher_configs: ClassVar[tuple[str, ...]] = ()  # which teachers the method accepts: "mm", "cm"

    def __init__(self, student: Network) -> None:
        super().__init__()
        self.student = student
        self._frozen: list[nn.Module] = []

    def freeze(self, module: nn.Module) -> nn.Module:
        """Mark `module` frozen: eval mode from now on, no gradients, never in the optimiser."""
        module.requires_grad_(False)
        module.eval()
        self._frozen.append(module)
        return module

    def train(self, mode: bool = True) -> "DistillationMethod":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def prepare(self, data: DeviceDataset, train_index: torch.Tensor) -> None:
        """Called once before training, e.g. to cache the outputs of frozen networks."""

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        """Named, weighted loss terms for one training batch at 0-based `epoch`; the engine sums them."""
        raise NotImplementedError

    def epoch_values(self, epoch: int) -> dict[str, float]:
        """Scalars worth logging for `epoch` (loss weights, schedules)."""
        return {}

    @classmethod
    def from_params(cls, student: Network, teacher: Network | None, params: Any) -> "DistillationMethod":
        """Build the method for `student` (and `teacher`) from the validated Params."""
        raise NotImplementedError(f"method {cls.name!r} cannot be built from params")

    @classmethod
    def run_params(cls, params: Any) -> dict[str, Any]:
        """The method's own params, flattened for the experiment tracker."""
        return {}
