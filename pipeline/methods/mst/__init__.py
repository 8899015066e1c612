"""MST-Distill (official-mst-spec.md): MaskNets and GateNet (mask_net.py, gate_net.py), the loss terms
(losses.py) and the three stages: collaborative_init.py, specialist_adaptation.py and
dynamic_distillation.py. pipeline/mst_pipeline.py runs them as pipeline stages.
"""
