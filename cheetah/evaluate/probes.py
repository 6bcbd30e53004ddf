"""Linear probes: what a frozen representation holds about the objects of a world scene.

The paper's mechanism is a chain of claims about representations: the vision encoder sees every object, the
caption-trained visual prompt keeps the large ones and drops the small details, and VPG-C's re-queried features
bring the details back. Each link is measured the same way, so the numbers compare: a linear classifier reads, from
all of an image's tokens at once (flattened), the shape, colour and texture of the object of one size in every grid
cell. It is fitted on the features of one set of scenes and scored on held-out scenes (`linear_probe`). A
representation that holds an attribute linearly scores near 100 %; one that does not, near the majority class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cheetah.world import CELLS, COLORS, SHAPES, TEXTURES, Scene

PROBE_ATTRS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES}
IGNORE = -100  # a cell without an object of the size asked about says nothing
PROBE_STREAM = 40_000
"""The seed stream of the scenes probes are fitted on (apart from the corpus' and the held-out ones)."""


def object_targets(scenes: Sequence[Scene], size: str) -> torch.Tensor:
    """(scenes, cells, attributes) class indices of the `size` object in every cell (IGNORE where there is none)."""
    out = torch.full((len(scenes), len(CELLS), len(PROBE_ATTRS)), IGNORE, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            if o.size == size:
                out[i, CELLS.index(o.cell)] = torch.tensor([values.index(getattr(o, attr))
                                                            for attr, values in PROBE_ATTRS.items()])
    return out


class AttentiveProbe(torch.nn.Module):
    """One learned query per grid cell attends over the tokens; one linear head per attribute, shared by the cells,
    reads the pooled vector. The attention lets the probe find a cell's object wherever the representation put it
    (the Q-Former's queries have no fixed order); everything after it is linear."""

    def __init__(self, dim: int, tokens: int, generator: torch.Generator):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(len(CELLS), dim, generator=generator) / dim ** 0.5)
        self.slot_bias = torch.nn.Parameter(torch.zeros(len(CELLS), tokens))
        self.key = torch.nn.Linear(dim, dim)
        self.heads = torch.nn.Linear(dim, sum(len(v) for v in PROBE_ATTRS.values()))

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(N, tokens, dim) -> per attribute, (N, cells, classes) logits."""
        weights = (torch.einsum("kd,ntd->nkt", self.queries, self.key(tokens)) + self.slot_bias).softmax(-1)
        pooled = torch.einsum("nkt,ntd->nkd", weights, tokens)
        return list(self.heads(pooled).split([len(v) for v in PROBE_ATTRS.values()], dim=-1))


def linear_probe(train: torch.Tensor, train_targets: torch.Tensor, test: torch.Tensor, test_targets: torch.Tensor,
                 *, steps: int = 300, lr: float = 0.01, weight_decay: float = 0.01, seed: int = 0
                 ) -> dict[str, float]:
    """Fit an `AttentiveProbe` on the tokens of `train` ((N, tokens, dim), standardised) to every cell's attributes
    (`object_targets`), full batch; returns the held-out accuracy (%) per attribute and their `mean`.
    Deterministic for a seed."""
    if train.shape[0] != train_targets.shape[0] or test.shape[0] != test_targets.shape[0]:
        raise ValueError("features and targets differ in number of scenes")
    x, x_test = train.float(), test.float()
    mean, std = x.flatten(0, 1).mean(0), x.flatten(0, 1).std(0).clamp(min=1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = AttentiveProbe(x.shape[-1], x.shape[1], generator)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = sum(torch.nn.functional.cross_entropy(z.flatten(0, 1), train_targets[..., a].flatten(),
                                                         ignore_index=IGNORE)
                       for a, z in enumerate(probe(x)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        result = {}
        for a, (attr, z) in enumerate(zip(PROBE_ATTRS, probe(x_test))):
            target = test_targets[..., a]
            here = target != IGNORE
            result[attr] = round(100.0 * float((z.argmax(-1) == target)[here].float().mean()), 2)
    result["mean"] = round(sum(result[a] for a in PROBE_ATTRS) / len(PROBE_ATTRS), 2)
    return result
