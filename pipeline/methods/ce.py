"""w/o KD: the network trained on its own with cross-entropy (the authors' main-S.py / main-T.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register


@register
class CrossEntropyOnly(DistillationMethod):
    """L = CE(student(x), y). Also how the multimodal and unimodal teachers are trained."""

    name = "ce"
    segmentation = True
    display_name = "w/o KD"
    table_order = 0

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "CrossEntropyOnly":
        return cls(setup.student)

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        return {"ce": F.cross_entropy(self.student(batch), batch["y"])}
