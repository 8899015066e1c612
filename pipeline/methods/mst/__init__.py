"""MST-Distill (official-mst-spec.md), registered as the method `mst` (method.py): MaskNets and GateNet
(mask_net.py, gate_net.py), the loss terms (losses.py), its three phases (collaborative_init.py,
specialist_adaptation.py, dynamic_distillation.py; averaged_distillation.py is phase 3 without routing),
its params block (params.py) and the Table 3 stage settings (settings.py).
"""

from pipeline.methods.mst.method import MSTDistill  # noqa: F401  (registers `mst`)
