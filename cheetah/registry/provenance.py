"""Whether a model may become champion, from the provenance recorded when it was trained and evaluated, and the
configuration tags of a version. The lineage itself (git commit, uncommitted files, dvc.lock and data hashes) is
`cheetah.provenance`.

Tags of every version: the lineage at registration (`git_commit`, `git_dirty`, `dvc_lock_hash`, `data_hash`,
`backbone_hash`, ...), the lineage recorded at training and at evaluation (`training.git_commit`,
`training.git_dirty`, `evaluation.git_commit`, ...), and `config.*`: the configuration it was trained in (preset,
backbone init, world size, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RECORDED_AT = ("training", "evaluation")
"""The moments whose code state a version carries besides its registration's lineage: the card's and the metrics'
`provenance` (cheetah.provenance.PROVENANCE_FIELD)."""


def recorded_tags(recorded: Mapping[str, Any]) -> dict[str, str]:
    """`training.git_commit`, `evaluation.git_dirty`, ...: the code state (cheetah.provenance.code_state) recorded at
    training and at evaluation, as tags."""
    return {f"{moment}.{k}": str(v) for moment in RECORDED_AT for tags in [recorded.get(moment)]
            if isinstance(tags, Mapping) for k, v in tags.items()}


def config_tags(card: Mapping[str, Any]) -> dict[str, str]:
    """The configuration a model was trained in, from its card: `config.preset`, `config.backbone_init` (pretrain,
    random, checkpoint), `config.random_backbone`, `config.world_size`, `config.zero_stage`, `config.precision`,
    `config.launcher`."""
    training = card.get("training") or {}
    tags = {f"config.{k}": str(card.get(k)) for k in ("backbone_init", "random_backbone")}
    tags.update({f"config.{k}": str(training.get(k)) for k in ("preset", "world_size", "zero_stage", "precision",
                                                              "launcher")})
    return tags


def champion_eligibility(now: Mapping[str, str], recorded: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a version may take `champion` automatically: its weights were trained, its metrics measured and it is
    registered from committed code, parameters and data (`git_dirty` false each time), none of it in a `dvc exp run`
    experiment nobody committed. `now` is the lineage at registration; `recorded` maps "training" and "evaluation"
    to the lineage the card and the metrics recorded (None when they recorded none: weights imported or trained
    before provenance was recorded). The rest become `challenger`; `cheetah registry promote` moves `champion` by
    hand, recorded with its reason."""
    for moment, tags in (*((m, recorded.get(m)) for m in RECORDED_AT), ("registration", now)):
        if not isinstance(tags, Mapping):
            return False, (f"its {moment} recorded no provenance (weights or metrics not written by this version "
                           "of `cheetah train` / `cheetah evaluate`)")
        if tags.get("dvc_experiment"):
            return False, (f"its {moment} ran in the DVC experiment {tags['dvc_experiment']!r}, not from committed "
                           "parameters")
        if tags.get("git_dirty") != "false":
            what = tags.get("git_uncommitted") or "git status unknown"
            return False, f"the code, parameters or data of its {moment} were not committed ({what})"
    return True, "committed code, parameters and data at training, evaluation and registration"
