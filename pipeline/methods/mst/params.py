"""MST-Distill's params block (official-mst-spec.md) and the fidelity switch that resolves it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.methods.common.features import check_architecture, check_modules
from pipeline.params import NON_NEGATIVE, POSITIVE, BlockError, each_value


EPOCHS_PER_DATASET = each_value(lambda v: v > 0, "integers > 0 per dataset")


@dataclass(frozen=True)
class MSTParams:
    """MST-Distill. Defaults follow the paper; the switches marked (Qn) reproduce the authors' code and are
    all turned on by the top-level `fidelity: official`.

    `teacher_set`: which teachers get MaskNets (paper Fig. 5). `hooks`: per network architecture, the module
    names MaskNets attach to, in order; the first `mask_layer_num` are used. `hidden_factor`: per dataset,
    MaskNet token width h = ⌊D/(factor·heads)⌋·heads (paper: 2). `collaborative_init_epochs` and
    `specialist_adaptation_epochs`: per dataset, the epochs of phases 1 and 2 (Q1: the authors' HEAD runs 1
    and 1). `specialist_adaptation_lr`: per dataset, the MaskNets' Adam lr (the authors' `--s2_lr`, 1e-4). `collaborative_init_detach`: DML-style
    detached alignment targets in phase 1 (paper Table 7).
    `lb_mode`: `kl` (paper Eq. 17) or `cv` (paper Table 8). `stacked_hooks` (Q2): a teacher's second
    specialist keeps its first MaskNet attached too. `lb_divide_by_n` (Q6): the KL load balancing divided by
    N. `decay_after_epoch0` (Q8): λ decays already fire at the end of epoch 0.
    `topk` and `fidelity` are the top-level keys of the same names, filled in by `with_topk` and `resolved`."""

    temperature: float = field(metadata=POSITIVE)
    teacher_set: Literal["mm", "cm", "mm+cm"]
    mask_layer_num: int = field(metadata=POSITIVE)
    heads: int = field(metadata=POSITIVE)
    hidden_factor: dict[str, float] = field(metadata=each_value(lambda v: v > 0, "numbers > 0 per dataset"))
    hooks: dict[str, list[str]]
    collaborative_init_epochs: dict[str, int] = field(metadata=EPOCHS_PER_DATASET)
    specialist_adaptation_epochs: dict[str, int] = field(metadata=EPOCHS_PER_DATASET)
    specialist_adaptation_lr: dict[str, float] = field(metadata=each_value(lambda v: v > 0,
                                                                            "numbers > 0 per dataset"))
    collaborative_init_detach: bool
    lambda_kd: float = field(metadata=NON_NEGATIVE)
    lambda_lb: float = field(metadata=NON_NEGATIVE)
    lb_mode: Literal["kl", "cv"]
    stacked_hooks: bool
    lb_divide_by_n: bool
    decay_after_epoch0: bool
    topk: int | None = field(default=None, metadata={"parsed_separately": True})  # phase 3 only
    fidelity: str = field(default="paper", metadata={"parsed_separately": True})

    @property
    def n_specialists(self) -> int:
        """N: MaskNets per teacher × teachers in the set."""
        return len(self.teacher_set.split("+")) * self.mask_layer_num

    def validate(self) -> None:
        for arch, layers in self.hooks.items():
            check_architecture(arch, f"hooks.{arch}")
            check_modules(arch, layers, f"hooks.{arch}")
            if len(layers) < self.mask_layer_num:
                raise BlockError(f"hooks.{arch}", f"lists {len(layers)} layers but mask_layer_num is "
                                                  f"{self.mask_layer_num}")

    def with_topk(self, topk: int) -> "MSTParams":
        """The block with the top-level `topk` (phase 3 only reads it)."""
        if not 1 <= topk <= self.n_specialists:
            raise BlockError("", f"topk {topk} exceeds the {self.n_specialists} specialised teachers (teacher_set "
                                 f"{self.teacher_set!r} × mask_layer_num {self.mask_layer_num})")
        return dataclasses.replace(self, topk=topk)

    def resolved(self, fidelity: str) -> "MSTParams":
        """The params in force: with `fidelity: official` every authors'-code switch is on and the first two
        phases run the authors' current default of one epoch each (Q1)."""
        block = dataclasses.replace(self, fidelity=fidelity)
        if fidelity == "paper":
            return block
        return dataclasses.replace(block, stacked_hooks=True, lb_divide_by_n=True, decay_after_epoch0=True,
                                   collaborative_init_epochs=_ones(self.collaborative_init_epochs),
                                   specialist_adaptation_epochs=_ones(self.specialist_adaptation_epochs))


def _ones(epochs: Any) -> Any:
    """One epoch for every dataset (a stage that does not read this key gets it back unchanged)."""
    return {key: 1 for key in epochs} if isinstance(epochs, dict) else epochs
