"""MST-Distill as one registered method (`mst`) with three phases, one per DVC stage:

1. `collaborative_init` (mst_s1, once per seed): the multimodal and both unimodal networks trained jointly;
   they become the teachers and the student's starting point.
2. `specialist_adaptation` (mst_s2, per seed and target): one MaskNet per hooked layer of each frozen
   teacher, fitted against the frozen student: N specialised teachers.
3. `dynamic_distillation` (mst_s3, per seed and target): the student trained with a GateNet routing each
   sample to its top-k specialised teachers (the "MST-Distill (MM+CM)" row of Table 1).

A run trains one phase (`MethodSetup.phase`); what an earlier phase produced comes back restored from its
checkpoints (`MethodSetup.restored`: "networks", role → network; "masks", the trained SpecialistMasks).
The stage ablation of paper Table 3 (`settings.py`) runs phase 3 with `setting` = which phases are on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.data.catalog import DatasetSpec
from pipeline.data.tensors import Batch
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register
from pipeline.methods.mst.averaged_distillation import AveragedDistillation
from pipeline.methods.mst.collaborative_init import collaborative_init_phase
from pipeline.methods.mst.dynamic_distillation import DynamicDistillation, LossWeights
from pipeline.methods.mst.params import MSTParams
from pipeline.methods.mst.settings import STAGE_SETTINGS
from pipeline.methods.mst.specialist_adaptation import (SpecialistMasks, TeacherGroup, build_group, masked_logits,
                                                        specialist_phase)
from pipeline.models.registry import Network
from pipeline.training.phases import Phase, RunContext

ROLES = ("mm", "m1", "m2")
PHASES = ("collaborative_init", "specialist_adaptation", "dynamic_distillation")


def specialist_labels(groups: list[TeacherGroup]) -> list[str]:
    """Names of the specialised teachers in routing order, e.g. "mm:fc1"."""
    return [f"{g.name}:{layer}" for g in groups for layer in g.layers]


def specialists_of(groups: list[TeacherGroup], stacked_hooks: bool) -> list[Callable[[Batch], torch.Tensor]]:
    """One logits function per specialised teacher. (Q2) with stacked hooks, specialist j of a teacher keeps
    MaskNets 0..j attached; the paper: only MaskNet j."""
    return [lambda batch, g=g, j=j: masked_logits(g, batch, list(range(j + 1)) if stacked_hooks else [j])
            for g in groups for j in range(len(g.layers))]


@register
class MSTDistill(DistillationMethod):
    """MST-Distill (Mixture of Specialized Teachers): see the module docstring for the three phases."""

    name = "mst"
    segmentation = True
    display_name = "MST-Distill"
    table_order = 100
    teacher_configs = ("mm+cm",)
    params_type = MSTParams
    phase_names = PHASES
    main_phase_name = "dynamic_distillation"

    def __init__(self, student: Network, phase: str, params: MSTParams, setting: str = "full") -> None:
        super().__init__(student)
        if phase not in PHASES:
            raise ValueError(f"unknown MST-Distill phase {phase!r}; expected one of {', '.join(PHASES)}")
        if phase == "dynamic_distillation" and setting not in STAGE_SETTINGS:
            raise ValueError(f"unknown MST-Distill setting {setting!r}; expected one of {', '.join(STAGE_SETTINGS)}")
        self.phase, self.params, self.setting = phase, params, setting
        self.networks: nn.ModuleDict | None = None
        self.groups: list[TeacherGroup] = []
        self.masks: SpecialistMasks | None = None
        self.objective: nn.Module | None = None
        self.dataset = ""

    @classmethod
    def run_params(cls, method_params: Any) -> dict[str, Any]:
        """The block, flattened for the tracker; `topk` only where it applies (phase 3)."""
        return {k: v for k, v in super().run_params(method_params).items() if not (k == "mst.topk" and v is None)}

    @classmethod
    def resolve_params(cls, block: MSTParams, params: Any) -> MSTParams:
        """The block in force under the top-level `fidelity` switch."""
        return block.resolved(params.fidelity)

    @classmethod
    def teacher_groups(cls, params: MSTParams, networks: dict[str, Network], target: str, sample: Batch,
                       dataset: str) -> list[TeacherGroup]:
        """Frozen teachers for `target` with fresh MaskNets at their hooked layers (MM first, then CM)."""
        other = DatasetSpec.other(target)
        groups = []
        for config in params.teacher_set.split("+"):
            network = networks["mm" if config == "mm" else other]
            layers = params.hooks.get(network.arch)
            if layers is None:
                raise KeyError(f"mst.hooks.{network.arch} is missing (MaskNet layers of the {config} teacher)")
            groups.append(build_group(config, network, layers[:params.mask_layer_num], sample,
                                      params.hidden_factor[dataset], params.heads))
        return groups

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "MSTDistill":
        p: MSTParams = setup.method_params
        phase = setup.phase or "dynamic_distillation"
        needs = {"collaborative_init": ("collaborative_init_epochs",),
                 "specialist_adaptation": ("hidden_factor", "specialist_adaptation_epochs",
                                           "specialist_adaptation_lr")}.get(phase, ())
        for block in needs:
            if setup.dataset not in getattr(p, block):
                raise KeyError(f"mst.{block}.{setup.dataset} is missing")
        if phase == "collaborative_init":
            # fresh networks, MM first: a fixed order of RNG draws for a given seed
            networks = {role: setup.build_network(role) for role in ROLES}
            method = cls(networks["m1"], phase, p)
            method.networks = nn.ModuleDict(networks)
            method.dataset = setup.dataset
            return method
        networks = setup.restored["networks"]
        student = setup.student if setup.student is not None else networks[setup.target]
        method = cls(student, phase, p, setup.setting if setup.setting != "default" else "full")
        method.dataset = setup.dataset
        if phase == "specialist_adaptation":
            method.groups = cls.teacher_groups(p, networks, setup.target, setup.sample, setup.dataset)
            method.masks = SpecialistMasks(method.groups)
            for network in (student, *(g.network for g in method.groups)):  # only the MaskNets train
                method.freeze(network)
            return method
        # dynamic_distillation: the teachers, masked by phase-2 MaskNets (S2) or plain
        setting = STAGE_SETTINGS[method.setting]
        if setting.s2:
            with torch.random.fork_rng(devices=[]):  # the MaskNets' initial weights are replaced by the loaded ones
                method.groups = cls.teacher_groups(p, networks, setup.target, setup.sample, setup.dataset)
            method.masks = SpecialistMasks(method.groups)
            method.masks.load_state_dict(setup.restored["masks"].state_dict())
            specialists = specialists_of(method.groups, p.stacked_hooks)
        else:
            other = setup.other
            method.groups = [TeacherGroup(config, networks["mm" if config == "mm" else other], [], nn.ModuleList())
                             for config in p.teacher_set.split("+")]
            specialists = [g.network for g in method.groups]
        for group in method.groups:
            method.freeze(group.network)
            method.freeze(group.masks)
        weights = LossWeights(p.lambda_kd, p.lambda_lb, p.decay_after_epoch0)
        if setting.s3:
            if p.topk is None:
                raise ValueError("MST-Distill phase 3 needs the top-level topk: pass the block through with_topk()")
            logits_shape = (setup.num_classes, *setup.sample["y"].shape[1:])
            method.objective = DynamicDistillation(specialists, logits_shape, topk=min(p.topk, len(specialists)),
                                                   temperature=p.temperature, lb_mode=p.lb_mode,
                                                   lb_divide_by_n=p.lb_divide_by_n, weights=weights,
                                                   cache=setup.cache_frozen_outputs)
        else:
            method.objective = AveragedDistillation(specialists, temperature=p.temperature, weights=weights,
                                                    cache=setup.cache_frozen_outputs)
        return method

    # ---- phases ----

    def phases(self, context: RunContext) -> list[Phase]:
        p = self.params
        if self.phase == "collaborative_init":
            return [collaborative_init_phase(dict(self.networks.items()),
                                             epochs=p.collaborative_init_epochs[self.dataset], lr=context.lr,
                                             temperature=p.temperature,
                                             detach_peer=p.collaborative_init_detach, context=context)]
        if self.phase == "specialist_adaptation":
            return [specialist_phase(self.student, self.groups, epochs=p.specialist_adaptation_epochs[self.dataset],
                                     lr=p.specialist_adaptation_lr[self.dataset], temperature=p.temperature, context=context)]
        return [self.main_phase(context)]

    def prepare(self, context: RunContext) -> None:
        self.objective.prepare(context)

    def loss_terms(self, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        return self.objective.terms(self.student(batch), batch, epoch)

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return self.objective.epoch_values(epoch)

    # ---- what a run evaluates, saves and reports ----

    def evaluated_networks(self) -> dict[str, Network]:
        if self.phase == "collaborative_init":
            return dict(self.networks.items())
        if self.phase == "specialist_adaptation":
            return {}
        return {"student": self.student}

    def checkpoints(self) -> dict[str, nn.Module]:
        if self.phase == "collaborative_init":
            return dict(self.networks.items())
        if self.phase == "specialist_adaptation":
            return {"masks": self.masks}
        return {}

    def run_extras(self, result: Any) -> dict[str, Any]:
        if self.phase == "specialist_adaptation":
            # absent when no epoch was finite (the run stopped on a non-finite loss; its health report says so)
            return {"val_score": result.final.best_metrics.get("val_score")}
        extras: dict[str, Any] = {}
        if self.phase == "dynamic_distillation":
            setting = STAGE_SETTINGS[self.setting]
            extras.update(S1=setting.s1, S2=setting.s2, S3=setting.s3)
            extras["topk"] = self.params.topk if setting.s3 else None
            if setting.s3:
                n = self.objective.num_teachers
                extras["specialists"] = specialist_labels(self.groups) if setting.s2 else [g.name for g in self.groups]
                extras["routing"] = [[epoch[f"route_{i}"] for i in range(n)] for epoch in result.final.history]
        return extras
