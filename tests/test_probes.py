"""The representation probes (cheetah/evaluate/probes.py) on constructed features: a representation that holds the
attributes reads near 100 % wherever it puts them, one that holds nothing reads at the majority class."""

from __future__ import annotations

import torch

from cheetah.evaluate.probes import IGNORE, PROBE_ATTRS, linear_probe, object_targets
from cheetah.world import CELLS, generate_scene


def _scenes(seed: int, n: int):
    return [generate_scene(seed, i, 32) for i in range(n)]


def _one_hot_tokens(scenes, size: str, shuffle: bool, noise: float = 0.0) -> torch.Tensor:
    """One token per cell, the one-hot of its object's attributes and cell (objects of `size` only), in cell order
    or shuffled per scene (like the Q-Former's queries), plus Gaussian noise."""
    widths = [len(v) for v in PROBE_ATTRS.values()]
    dim = len(CELLS) + sum(widths)
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(len(scenes), len(CELLS), dim)
    targets = object_targets(scenes, size)
    for i in range(len(scenes)):
        order = torch.randperm(len(CELLS), generator=g) if shuffle else torch.arange(len(CELLS))
        for k in range(len(CELLS)):
            if targets[i, k, 0] == IGNORE:
                continue
            token = out[i, order[k]]
            token[k] = 1
            offset = len(CELLS)
            for a, width in enumerate(widths):
                token[offset + targets[i, k, a]] = 1
                offset += width
    return out + noise * torch.randn(out.shape, generator=g)


def test_attributes_are_read_wherever_a_representation_puts_them():
    fit, test = _scenes(1, 600), _scenes(2, 200)
    for shuffle in (False, True):
        result = linear_probe(_one_hot_tokens(fit, "small", shuffle, 0.1), object_targets(fit, "small"),
                              _one_hot_tokens(test, "small", shuffle, 0.1), object_targets(test, "small"))
        assert set(result) == {*PROBE_ATTRS, "mean"}
        assert result["mean"] > 95, (shuffle, result)


def test_a_representation_without_the_objects_reads_at_chance_and_the_probe_is_deterministic():
    fit, test = _scenes(1, 600), _scenes(2, 200)
    blind_fit, blind_test = torch.randn(600, 9, 16), torch.randn(200, 9, 16)
    result = linear_probe(blind_fit, object_targets(fit, "small"), blind_test, object_targets(test, "small"))
    assert result["shape"] < 30 and result["color"] < 20 and result["texture"] < 45, result
    again = linear_probe(blind_fit, object_targets(fit, "small"), blind_test, object_targets(test, "small"))
    assert again == result
    # the large objects' probe does not read the small ones' tokens
    holds_small = linear_probe(_one_hot_tokens(fit, "small", False), object_targets(fit, "large"),
                               _one_hot_tokens(test, "small", False), object_targets(test, "large"))
    assert holds_small["mean"] < 50, holds_small
