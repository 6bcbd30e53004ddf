"""Training: the base stage of the embedded default, and VPG-C training with DeepSpeed."""
