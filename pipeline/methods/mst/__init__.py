"""MST-Distill's building blocks (official-mst-spec.md §4): MaskNets, the GateNet and the stage-3 losses.

The three-stage method itself (collaborative initialisation, specialised teacher adaptation, dynamic
distillation) is built on these in a later change.
"""
