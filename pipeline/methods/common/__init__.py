"""What the methods share: the contract and registry (base.py), the α weighting (alpha.py), KL helpers
(kl.py), architecture-pair tap tables and the feature-shape probe (features.py), cached frozen outputs
(frozen.py) and tapped features with L2 embeddings (tapped_features.py)."""
