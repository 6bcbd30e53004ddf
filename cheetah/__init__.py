"""Cheetah: VPG-C on BLIP-2-family multimodal LLMs, its synthetic training data, training, and evaluation."""

__version__ = "0.1.0"
