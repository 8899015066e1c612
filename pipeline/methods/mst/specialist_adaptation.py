"""MST-Distill stage 2, specialised teacher adaptation (paper §3.2, Eqs. 5–10; official-mst-spec.md §5.2).

A MaskNet is inserted at each chosen layer of each frozen teacher (the multimodal network and the
other-modality network, both from stage 1). Each MaskNet makes one specialised teacher and is trained
alone, with only its own hook active, to minimise T²·KL(p_student ‖ p_masked-teacher) with the stage-1
student as the detached target. All base weights stay frozen; gradients flow through the frozen upper
layers into the MaskNet only. After every epoch the summed mean validation KL decides which set of
MaskNet weights is kept (one joint choice, as the authors).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.data.tensors import Batch, DeviceDataset
from pipeline.methods.kd import softened_kl
from pipeline.methods.mst.mask_net import apply_mask, mask_net_for
from pipeline.models.registry import DISPLAY_NAMES, Network
from pipeline.models.taps import FeatureTaps


@dataclass
class TeacherGroup:
    """A frozen teacher, the layers it is masked at, and one MaskNet per layer."""

    name: str                 # "mm" or "cm"
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


def specialist_adaptation(student: Network, groups: list[TeacherGroup], data: DeviceDataset,
                          split: dict[str, torch.Tensor], *, epochs: int, batch_size: int, lr: float,
                          temperature: float, generator: torch.Generator,
                          on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train every MaskNet of `groups` alone against the frozen `student`; load the best joint set."""
    student.requires_grad_(False)
    student.eval()
    slots = [(g, j) for g in groups for j in range(len(g.layers))]
    optimizers = [torch.optim.Adam(g.masks[j].parameters(), lr=lr) for g, j in slots]
    best_score, best_states, best_epoch = float("inf"), None, -1
    metrics: dict[str, float] = {}
    for epoch in range(epochs):
        train_kl = _epoch_kls(student, slots, data, split["train"], batch_size, temperature, generator, optimizers)
        with torch.no_grad():
            val_kl = _epoch_kls(student, slots, data, split["val"], batch_size, temperature, None, None)
        score = sum(_group_means(slots, val_kl).values())
        metrics = {**{f"train_kl_{g.name}_{g.layers[j]}": v for (g, j), v in zip(slots, train_kl)},
                   **{f"val_kl_{g.name}_{g.layers[j]}": v for (g, j), v in zip(slots, val_kl)},
                   "val_score": score}
        if score < best_score:
            best_score, best_epoch = score, epoch
            best_states = [copy.deepcopy(g.masks.state_dict()) for g in groups]
        metrics["best_epoch"] = best_epoch
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    for group, state in zip(groups, best_states):
        group.masks.load_state_dict(state)
        group.masks.eval()
    return metrics


def _group_means(slots, values) -> dict[str, float]:
    """Mean KL per teacher group (the authors' score is mean T-KL + mean A-KL)."""
    sums: dict[str, list[float]] = {}
    for (group, _), value in zip(slots, values):
        sums.setdefault(group.name, []).append(value)
    return {name: sum(v) / len(v) for name, v in sums.items()}


def _epoch_kls(student, slots, data, index, batch_size, temperature, generator, optimizers) -> list[float]:
    """Mean per-batch KL of each MaskNet slot over `index`; trains the slots when optimisers are given."""
    training = optimizers is not None
    totals = [0.0] * len(slots)
    n_batches = 0
    for batch in data.batches(index, batch_size, generator):
        with torch.no_grad():
            target = student(batch)
        for k, (group, j) in enumerate(slots):
            group.masks[j].train(training)
            kl = softened_kl(masked_logits(group, batch, [j]), target, temperature)
            if training:
                optimizers[k].zero_grad(set_to_none=True)
                kl.backward()
                optimizers[k].step()
            totals[k] += kl.item()
        n_batches += 1
    return [t / n_batches for t in totals]
