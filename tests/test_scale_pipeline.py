"""One DAG for every scale, end to end on this CPU: a non-default parameters file — the `mini` preset (the vicuna-7b
architecture at toy width) with a random backbone written by the base stage, bf16, ZeRO-2, gradient checkpointing,
features cached on disk and two ranks through `train.launcher` (torchrun) — made the pipeline's params.yaml with
`cheetah pipeline use` and run by a plain `dvc repro` on an unchanged dvc.yaml; `dvc status` is clean afterwards,
and the registered version's tags name that configuration.

Random weights and registration: the backbone is a checkpoint directory written by a stage and versioned by DVC
(`base.init: random`), which evaluation and serving load like the 7B one, so it registers, under the config's own
model name, with `config.backbone_init = random` on the version. Weights trained on a backbone built in the training
process (`model.random_backbone`) exist nowhere else; their card says `random_backbone: true`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

COPY = ["cheetah", "configs", "dvc.yaml", "data.dvc", "pyproject.toml", ".dvc/config", ".dvcignore", ".gitignore",
        "data/.gitignore"]
SHRINK = {"world": {"n": 32, "image_size": 32},
          "synthesize": {"n": 16, "captions": 16},
          "train": {"steps": 2, "checkpoint_every": 2, "eval_every": 2, "heldout_fraction": 0.1},
          "evaluate": {"demon_per_task": 1, "mme_per_subtask": 2, "max_new_tokens": 4}}


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed:\n{(done.stdout + done.stderr)[-5000:]}"
    return done.stdout + done.stderr


def test_mini_random_config_runs_through_dvc_repro_with_two_ranks(tmp_path):
    from conftest import copy_checkout

    repo = copy_checkout(tmp_path / "repo", COPY)
    env = {k: v for k, v in os.environ.items() if k != "CHEETAH_PARENT_RUN_ID"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    cheetah = [sys.executable, "-m", "cheetah.cli"]
    dvc = [sys.executable, "-m", "dvc"]

    # The config as the pipeline's params.yaml (every field written out), shrunk to seconds per stage.
    _run([*cheetah, "pipeline", "use", "configs/mini-random.yaml"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SHRINK.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=ci@cheetah", "-c", "user.name=ci"]
    _run([*git, "init", "-q"], repo, env)
    _run([*cheetah, "pipeline", "source"], repo, env)  # the embedded world of world.*, recorded in data.dvc
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "mini-random"], repo, env)

    out = _run([*dvc, "repro"], repo, env)
    assert [s for s in ("base", "synthesize", "validate", "train", "benchmarks", "evaluate", "register")
            if f"Running stage '{s}'" not in out] == []
    assert "launching: " in out and "--nproc_per_node 2 -m cheetah.cli train" in out
    status = subprocess.run([*dvc, "status", "--json"], cwd=repo, env=env, capture_output=True, text=True)
    assert json.loads(status.stdout or "{}") == {}, status.stdout + status.stderr

    train = json.loads((repo / "metrics" / "train-mini.json").read_text())
    assert (train["world_size"], train["precision"], train["preset"]) == (2, "bf16", "mini")
    store = next((repo / ".cache" / "vit-features").iterdir())
    assert json.loads((store / "store.json").read_text())["images"] > 0  # computed once, by both ranks
    card = json.loads((repo / "checkpoints" / "vpgc-mini" / "vpgc.json").read_text())
    assert card["backbone_init"] == "random" and card["random_backbone"] is False
    assert card["backbone"] == "data/backbone-mini" and card["num_query_tokens"] == 32

    from mlflow.tracking import MlflowClient

    receipt = json.loads((repo / "metrics" / "register.json").read_text())
    assert receipt["model_name"] == "cheetah-vpgc-mini-random"
    version = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_model_version(receipt["model_name"],
                                                                              str(receipt["version"]))
    tags = version.tags
    assert {k: tags[k] for k in ("config.preset", "config.backbone_init", "config.world_size", "config.zero_stage",
                                 "config.precision", "config.launcher")} == {
        "config.preset": "mini", "config.backbone_init": "random", "config.world_size": "2",
        "config.zero_stage": "2", "config.precision": "bf16",
        "config.launcher": "torchrun --standalone --nproc_per_node 2"}
    assert tags["backbone_hash"].endswith(".dir") and tags["backbone"] == "data/backbone-mini"
