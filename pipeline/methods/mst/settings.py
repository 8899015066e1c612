"""The stage ablation of paper Table 3, defined once: which of MST-Distill's three phases are on.

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
