"""The stage ablation of paper Table 3, defined once: which of MST-Distill's three phases are on.

Also the method variants behind paper Tables 7 and 8 and Fig. 5 (`MST_VARIANTS`): each changes MST-Distill's
params block and re-runs the phases from the first one it affects.

"No S1": teachers trained independently (the teachers stage) and a freshly initialised student; "no S2":
the plain teachers, unmasked (N = number of teachers); "no S3": the teachers' distillation signals
averaged (no GateNet). "full" is the MST-Distill row of Table 1 (the mst_s3 stage itself).
"""

from __future__ import annotations

from typing import NamedTuple


class StageSetting(NamedTuple):
    label: str   # as printed in Table 3
    s1: bool     # collaborative initialisation
    s2: bool     # specialised MaskNet teachers
    s3: bool     # GateNet top-k routing


STAGE_SETTINGS: dict[str, StageSetting] = {
    "baseline": StageSetting("Baseline", False, False, False),
    "a": StageSetting("(a)", True, False, False),
    "b": StageSetting("(b)", False, True, False),
    "c": StageSetting("(c)", False, False, True),
    "d": StageSetting("(d)", True, True, False),
    "e": StageSetting("(e)", True, False, True),
    "f": StageSetting("(f)", False, True, True),
    "full": StageSetting("MST-Distill", True, True, True),
}
ABLATION_SETTINGS = [name for name in STAGE_SETTINGS if name != "full"]


class MethodVariant(NamedTuple):
    label: str          # as printed in its table or figure
    output: str         # "table7", "table8" or "fig5"
    overrides: dict     # fields of the `mst` params block
    first_phase: str    # the first phase the change affects: collaborative_init | specialist_adaptation |
                        # dynamic_distillation (earlier phases are the default pipeline's)


# The default pipeline's MST-Distill (mst_s3) is the other row of each: joint stage 1 (Table 7), KL load
# balancing (Table 8) and the MM+CM teacher set (Fig. 5).
MST_VARIANTS: dict[str, MethodVariant] = {
    "s1_detached": MethodVariant("Detached (DML-style)", "table7", {"collaborative_init_detach": True},
                                 "collaborative_init"),
    "lb_cv": MethodVariant("CV", "table8", {"lb_mode": "cv"}, "dynamic_distillation"),
    "teachers_mm": MethodVariant("MM", "fig5", {"teacher_set": "mm"}, "specialist_adaptation"),
    "teachers_cm": MethodVariant("CM", "fig5", {"teacher_set": "cm"}, "specialist_adaptation"),
}
DEFAULT_VARIANT_LABELS = {"table7": "Joint (paper)", "table8": "KL (paper Eq. 17)", "fig5": "MM+CM"}
