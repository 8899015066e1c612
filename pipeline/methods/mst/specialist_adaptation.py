"""MST-Distill phase 2, specialised teacher adaptation (paper §3.2, Eqs. 5–10; official-mst-spec.md §5.2).

A MaskNet is inserted at each chosen layer of each frozen teacher (the multimodal network and the
other-modality network, both from phase 1). Each MaskNet makes one specialised teacher and is trained
alone, with only its own hook active, to minimise T²·KL(p_student ‖ p_masked-teacher) with the phase-1
student as the detached target. All base weights stay frozen; gradients flow through the frozen upper
layers into the MaskNet only. After every epoch the summed mean validation KL decides which set of
MaskNet weights is kept (one joint choice, as the authors).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.data.tensors import Batch
from pipeline.methods.common.kl import softened_kl
from pipeline.methods.mst.mask_net import apply_mask, mask_net_for
from pipeline.models.registry import DISPLAY_NAMES, Network
from pipeline.models.taps import FeatureTaps
from pipeline.training.phases import Phase, RunContext


@dataclass
class TeacherGroup:
    """A frozen teacher, the layers it is masked at, and one MaskNet per layer."""

    name: str                 # "mm" or "cm": the teacher's configuration
    network: Network
    layers: list[str]
    masks: nn.ModuleList


def resolve_modules(network: Network, layers: Sequence[str]) -> list[nn.Module]:
    """The named submodules of `network.body`; a name that is not a module is a clear error."""
    modules = dict(network.body.named_modules())
    missing = [name for name in layers if name not in modules or not name]
    if missing:
        known = ", ".join(name for name in modules if name)
        raise KeyError(f"MST hook {missing[0]!r} is not a module of {DISPLAY_NAMES.get(network.arch, network.arch)}; "
                       f"its modules are: {known}")
    return [modules[name] for name in layers]


@torch.no_grad()
def feature_shapes(network: Network, layers: Sequence[str], batch: Batch) -> list[tuple[int, ...]]:
    """Per-sample output shapes of the named layers, from one forward pass."""
    network.eval()
    with FeatureTaps(network.body, layers) as taps:
        network(batch)
    return [tuple(taps[name].shape[1:]) for name in layers]


def build_group(name: str, network: Network, layers: Sequence[str], sample: Batch, hidden_factor: float,
                heads: int) -> TeacherGroup:
    """Freeze `network` and create one MaskNet per hooked layer, sized by the layer's feature shape."""
    resolve_modules(network, layers)
    network.requires_grad_(False)
    network.eval()
    shapes = feature_shapes(network, layers, sample)
    masks = nn.ModuleList(mask_net_for(shape, hidden_factor, heads) for shape in shapes)
    return TeacherGroup(name, network, list(layers), masks.to(sample["y"].device))


@contextmanager
def masks_attached(network: Network, layers: Sequence[str], masks: Sequence[nn.Module]) -> Iterator[None]:
    """Forward hooks replacing each layer's output by mask ⊙ output while the context is open."""
    handles = [module.register_forward_hook(lambda _m, _i, out, mask=mask: apply_mask(mask, out))
               for module, mask in zip(resolve_modules(network, layers), masks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def masked_logits(group: TeacherGroup, batch: Batch, active: Sequence[int]) -> torch.Tensor:
    """The teacher's logits with the MaskNets at positions `active` attached."""
    with masks_attached(group.network, [group.layers[i] for i in active], [group.masks[i] for i in active]):
        return group.network(batch)


class SpecialistMasks(nn.ModuleDict):
    """The MaskNets of every teacher group, by group name, as one checkpointable module; its
    `checkpoint_meta` (the hooked layers per group) is saved with the weights and checked on loading."""

    def __init__(self, groups: Sequence[TeacherGroup]) -> None:
        super().__init__({g.name: g.masks for g in groups})
        self.checkpoint_meta = {g.name: list(g.layers) for g in groups}


def specialist_phase(student: Network, groups: list[TeacherGroup], *, epochs: int, lr: float, temperature: float,
                     context: RunContext) -> Phase:
    """Phase `specialist_adaptation`: every MaskNet trained alone against the frozen `student` (the loss of
    slot k, T²·KL(p_student ‖ p_teacher with only MaskNet k attached), depends on MaskNet k alone, so one
    backward of their sum and one Adam with a parameter group per MaskNet is exactly one Adam per MaskNet);
    the epoch with the lowest summed mean validation KL per teacher keeps its MaskNets (one joint choice)."""
    student.requires_grad_(False)
    student.eval()
    slots = [(g, j) for g in groups for j in range(len(g.layers))]
    names = [f"kl_{g.name}_{g.layers[j]}" for g, j in slots]

    def loss_terms(batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = student(batch)
        return {name: softened_kl(masked_logits(g, batch, [j]), target, temperature)
                for name, (g, j) in zip(names, slots)}

    @torch.no_grad()
    def validate(epoch: int) -> dict[str, float]:
        for g in groups:
            g.masks.eval()
        totals, n_batches = [0.0] * len(slots), 0
        for batch in context.batches("val"):
            target = student(batch)
            for k, (g, j) in enumerate(slots):
                totals[k] += softened_kl(masked_logits(g, batch, [j]), target, temperature).item()
            n_batches += 1
        values = [t / n_batches for t in totals]
        score = sum(_group_means(slots, values).values())
        return {**{f"val_{name}": v for name, v in zip(names, values)}, "val_score": score}

    def after() -> None:
        for g in groups:
            g.masks.eval()

    return Phase("specialist_adaptation", epochs, loss_terms,
                 lambda: torch.optim.Adam([{"params": g.masks[j].parameters()} for g, j in slots], lr=lr),
                 train_modules=[g.masks for g in groups], validate=validate,
                 score=lambda metrics, epoch: metrics["val_score"], selected=[g.masks for g in groups], after=after)


def _group_means(slots, values) -> dict[str, float]:
    """Mean KL per teacher group (the authors' score is mean T-KL + mean A-KL)."""
    sums: dict[str, list[float]] = {}
    for (group, _), value in zip(slots, values):
        sums.setdefault(group.name, []).append(value)
    return {name: sum(v) / len(v) for name, v in sums.items()}
