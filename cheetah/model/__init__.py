"""Backbones, VPG-C, prompts, weights and the import of the official checkpoints."""
