"""VPG-C training with DeepSpeed on CPU: golden losses, ZeRO stages, every launcher (2 ranks under torchrun as two
nodes, 3 ranks sharing uneven batches under DeepSpeed's launcher with the token-mean loss) against one process, the user's DeepSpeed config, random backbones, and
resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tokenizer, write_instruction_set
from safetensors.torch import load_file

from cheetah.config import TrainConfig, load_params
from cheetah.model.backbones import build_backbone, save_backbone
from cheetah.model.vpgc import VPGCModel
from cheetah.train.data import JointSampler
from cheetah.train.schedule import lr_lambda
from cheetah.train.vpgc import init_queries, make_optimizer, query_geometry, train_vpgc

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cheetah.cli"]


def _clean_env() -> dict:
    """One thread per process on this 2-core machine (an in-process run leaves no rank variables behind:
    test_a_group_of_one_leaves_the_environment_as_it_found_it)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    save_backbone(build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=0), d / "backbone")
    write_instruction_set(d / "syn", n_synthetic=24, n_captions=24)
    return d


def _params(d: Path, name: str, **train) -> dict:
    base = {"data": str(d / "syn"), "out": str(d / name / "vpgc"), "state_dir": str(d / name / "state"),
            "metrics": str(d / name / "train.json"), "curve": str(d / name / "curve.csv"), "steps": 6,
            "synthetic_batch": 4, "caption_batch": 4, "checkpoint_every": 3, "eval_every": 3, "heldout_fraction": 0.2,
            "warmup_steps": 1, "lr": 0.01, "log_every": 2, "zero_stage": 0}
    return {"model": {"preset": "tiny", "backbone_dir": str(d / "backbone")}, "train": {**base, **train}}


def _write_params(d: Path, name: str, **train) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_params(d, name, **train)))
    return path


def _run(d: Path, name: str, **train):
    overrides = [f"{section}.{k}={json.dumps(v)}" for section, vals in _params(d, name, **train).items()
                 for k, v in vals.items()]
    return train_vpgc(load_params(None, overrides))


def _curve(d: Path, name: str) -> list[float]:
    with open(d / name / "curve.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _weights(d: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(d / name / "vpgc" / "vpgc.safetensors"))


@pytest.fixture(autouse=True)
def _mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_schedule_and_sampler_are_pure_functions_of_the_step():
    f = lr_lambda(2, 10, "cosine")
    assert [round(f(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    s = JointSampler(10, 7, 4, 3, seed=1)
    first = [s.step(i) for i in range(6)]
    assert first == [JointSampler(10, 7, 4, 3, seed=1).step(i) for i in range(6)]
    seen = [i for syn, _ in first[:5] for i in syn][:10]
    assert sorted(seen) == list(range(10))  # one epoch is a permutation: every example once


def test_query_and_guide_learning_rates_reach_their_parameters_only():
    model = VPGCModel(build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=0))
    vpgc = model.vpgc

    def groups(cfg: TrainConfig) -> dict[int, tuple[float, float]]:
        return {id(p): (g["lr"], g["weight_decay"]) for g in make_optimizer(model, cfg).param_groups for p in g["params"]}

    official = groups(TrainConfig(lr=1e-4, weight_decay=0.05))  # one rate; LAVIS's decay rule
    assert official[id(vpgc.query_tokens)] == official[id(vpgc.llm_proj.weight)] == (1e-4, 0.05)
    assert official[id(vpgc.llm_proj.bias)] == official[id(vpgc.qformer_proj.bias)] == (1e-4, 0.0)
    cfg = TrainConfig(lr=3e-3, query_lr=1e-3, guide_lr=1e-5, weight_decay=0.0)
    split = groups(cfg)
    assert split[id(vpgc.query_tokens)] == (1e-3, 0.0)
    assert split[id(vpgc.qformer_proj.weight)] == split[id(vpgc.qformer_proj.bias)] == (1e-5, 0.0)
    assert split[id(vpgc.llm_proj.weight)] == split[id(vpgc.llm_proj.bias)] == (3e-3, 0.0)
    assert len(split) == sum(1 for _ in vpgc.parameters())
    assert make_optimizer(model, cfg).param_groups[0]["lr"] == 3e-3  # the logged rate is `train.lr`


def test_query_geometry_measures_the_guide_against_the_queries(tiny_backbone):
    """`query_geometry`: a zero guide leaves the queries' own pairwise cosine; a guide that outgrows the queries
    makes every query the same vector (cosine 1), the failure of docs/miniature.md point 14."""
    vpgc = VPGCModel(tiny_backbone).vpgc
    tokens = vpgc.query_tokens[0].detach()  # (L, Q)
    length = tokens.shape[0]
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    own_cosine = (unit @ unit.T)[~torch.eye(length, dtype=torch.bool)].mean()
    at_zero = query_geometry(vpgc.query_tokens, torch.zeros(2, tokens.shape[1]))
    torch.testing.assert_close(at_zero[:, 0], torch.zeros(2))
    torch.testing.assert_close(at_zero[:, 1], tokens.norm(dim=-1).mean().expand(2))
    torch.testing.assert_close(at_zero[:, 2], own_cosine.expand(2))
    assert float(own_cosine) < 0.5  # the backbone's queries point different ways
    shift = 1e4 * torch.randn(3, tokens.shape[1], generator=torch.Generator().manual_seed(0))
    swamped = query_geometry(vpgc.query_tokens, shift)
    torch.testing.assert_close(swamped[:, 0], shift.norm(dim=-1))
    assert bool((swamped[:, 2] > 0.999).all())



def test_new_queries_are_the_caption_queries_or_drawn_at_their_scale(tiny_backbone):
    """`train.query_init`: "copy" keeps the backbone's caption-trained queries (the official code); "random" redraws
    them at their standard deviation, the same for the same seed (every rank), other for another."""
    caption = VPGCModel(tiny_backbone).backbone.query_tokens.detach().clone()
    model = VPGCModel(tiny_backbone)
    init_queries(model, "copy", 0)
    assert torch.equal(model.vpgc.query_tokens.detach(), caption)
    init_queries(model, "random", 0)
    drawn = model.vpgc.query_tokens.detach().clone()
    assert not torch.allclose(drawn, caption) and drawn.shape == caption.shape
    assert abs(float(drawn.std()) - float(caption.std())) < 0.2 * float(caption.std())
    again = VPGCModel(tiny_backbone)
    init_queries(again, "random", 0)
    assert torch.equal(again.vpgc.query_tokens.detach(), drawn)
    init_queries(again, "random", 1)
    assert not torch.equal(again.vpgc.query_tokens.detach(), drawn)

WEIGHT_ATOL = 1e-3
"""Weights of two runs that differ only in the order of a sum (ZeRO stage, ranks, threads): Adam divides each
update by the gradient's own scale, so on a near-zero gradient a rounding difference becomes a visible fraction of
one step (lr 0.01 here; one element of 12,288 measured 1.9e-4 apart, and 6.5e-4 under the AVX2 kernels every command
now runs with). Weights move by ~0.05 in these runs; the loss curves must still agree to 1e-5."""


@pytest.mark.slow  # ~47 s: `make test` runs it, `make test-fast` (the edit-test loop) leaves it out
def test_golden_losses_and_zero_stages_agree(workspace):
    """torchtune-style recipe test: the loss of a few steps against golden values (CPU, fp32), and the same curve
    under ZeRO-2 and ZeRO-3. Tolerances: losses 1e-5 relative; weights WEIGHT_ATOL."""
    m0 = _run(workspace, "zero0", zero_stage=0)
    curve0 = _curve(workspace, "zero0")
    golden = [6.3119, 6.3503, 6.311, 6.3735, 6.1552, 6.24]
    torch.testing.assert_close(torch.tensor(curve0), torch.tensor(golden), rtol=0, atol=2e-3)
    assert m0["heldout_loss_final"] < m0["heldout_loss_init"]
    # ZeRO-2 with a user DeepSpeed config merged in (settings that do not change the arithmetic).
    user = workspace / "ds-user.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 2**20},
                                "train_micro_batch_size_per_gpu": "auto"}))
    for stage in (2, 3):
        _run(workspace, f"zero{stage}", zero_stage=stage, deepspeed_config=str(user) if stage == 2 else None)
        torch.testing.assert_close(torch.tensor(_curve(workspace, f"zero{stage}")), torch.tensor(curve0),
                                   rtol=1e-5, atol=0)
        for k, v in _weights(workspace, "zero0").items():
            torch.testing.assert_close(_weights(workspace, f"zero{stage}")[k], v, rtol=1e-4, atol=WEIGHT_ATOL)
    # The held-out guide geometry reads whole query tokens under every stage (ZeRO-3 keeps them unpartitioned).
    m3 = json.loads((workspace / "zero3" / "train.json").read_text())
    for name in ("heldout_guide_norm_final", "heldout_query_norm_final", "heldout_query_cosine_final"):
        assert m0[name] > 0 and math.isclose(m3[name], m0[name], rel_tol=1e-3), name
    card = json.loads((workspace / "zero3" / "vpgc" / "vpgc.json").read_text())
    assert card["training"]["zero_stage"] == 3 and card["update_layer"] == 2
    assert card["random_backbone"] is False  # a checkpoint directory, not weights built in the process
    merged = json.loads((workspace / "zero2" / "state" / "deepspeed_config.json").read_text())
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 2**20,
                                           "allgather_bucket_size": sum(v.numel() for v in _weights(
                                               workspace, "zero2").values()), "overlap_comm": True}
    assert merged["train_micro_batch_size_per_gpu"] == 8 and merged["gradient_clipping"] == 1.0


@pytest.fixture(scope="module")
def one_process(workspace):
    """The reference for every launcher: `cheetah train` as one plain process (ZeRO-2)."""
    _cli("--params", str(_write_params(workspace, "one", zero_stage=2)), "train", env=_clean_env())
    return "one"


def _assert_matches(workspace: Path, name: str, reference: str, world: int) -> None:
    """2 ranks each take half of the same global batch: the single-process curve and weights, up to the reduction
    order (losses 1e-5 relative; weights 1e-4 relative + WEIGHT_ATOL)."""
    assert json.loads((workspace / name / "train.json").read_text())["world_size"] == world
    torch.testing.assert_close(torch.tensor(_curve(workspace, name)), torch.tensor(_curve(workspace, reference)),
                               rtol=1e-5, atol=0)
    for k, v in _weights(workspace, reference).items():
        torch.testing.assert_close(_weights(workspace, name)[k], v, rtol=1e-4, atol=WEIGHT_ATOL)


@pytest.mark.slow
def test_torchrun_two_nodes_match_one(workspace, one_process):
    """Two torchrun launchers (`--nnodes 2`, one rank each) meeting at a c10d rendezvous on localhost, as two nodes
    would: the single-process weights."""
    params = _write_params(workspace, "nodes", zero_stage=2)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", endpoint, "--rdzv_id", "cheetah-test", "-m", "cheetah.cli",
                               "--params", str(params), "train"], cwd=REPO, env=_clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    _assert_matches(workspace, "nodes", one_process, world=2)


@pytest.mark.slow
def test_three_ranks_under_the_deepspeed_launcher_match_one_and_resume_on_no_other_count(workspace):
    """`train.launcher: deepspeed --num_gpus 3`: `cheetah train` relaunches itself under DeepSpeed's launcher (which
    appends --local_rank=N to each rank's arguments, which the CLI accepts), 3 ranks share steps of 4 + 4 examples
    unevenly (3 + 3 + 2), with the official token-mean loss (issue 12): the step's target-token count is all-reduced,
    so 3 ranks = 1 process. Its finished state is then refused by name by a run on another number of ranks."""
    one = _write_params(workspace, "one-token", zero_stage=2, loss_reduction="token")
    launcher = f"deepspeed --num_gpus 3 --master_port {_free_port()}"
    three = _write_params(workspace, "ds-token", zero_stage=2, loss_reduction="token", launcher=launcher)
    env = _clean_env()
    _cli("--params", str(one), "train", env=env)
    out = _cli("--params", str(three), "train", env=env)
    assert "--local_rank=2" in out.stdout + out.stderr  # (the launcher's log of the command it ran)
    _assert_matches(workspace, "ds-token", "one-token", world=3)
    # A loss other than the sample mean's: the equality above is not the same run twice.
    sample = _run(workspace, "one-sample", zero_stage=2, loss_reduction="sample", steps=1)
    assert abs(_curve(workspace, "one-token")[0] - _curve(workspace, "one-sample")[0]) > 1e-3, sample

    alone = subprocess.run([*CLI, "--params", str(_write_params(workspace, "ds-token", zero_stage=2,
                                                                  loss_reduction="token")), "train"],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert alone.returncode == 2, alone.stderr[-3000:]
    assert alone.stderr.strip().splitlines()[-1].endswith(
        "step-000006: written by 3 rank(s), and this run has 1: its optimiser state is partitioned over 3. Resume "
        "with 3 rank(s), or start over with `cheetah train --restart`")


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_identical_weights(workspace):
    steps = dict(steps=12, checkpoint_every=2, eval_every=6)
    straight = _write_params(workspace, "straight", **steps)
    killed = _write_params(workspace, "killed", **steps)
    env = _clean_env()
    _cli("--params", str(straight), "train", env=env)

    state = workspace / "killed" / "state"
    proc = subprocess.Popen([*CLI, "--params", str(killed), "train"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        latest = state / "latest"
        if latest.exists() and latest.read_text().strip() >= "step-000004":
            break
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed")
        time.sleep(0.05)
    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)  # its DataLoader workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"{len(alive)} DataLoader worker(s) outlived the killed run"
    stopped_at = (state / "latest").read_text().strip()
    assert stopped_at < "step-000012", "the run was not killed mid-way"
    assert not (workspace / "killed" / "vpgc").exists()

    out = _cli("--params", str(killed), "train", env=env)
    assert f"resuming VPG-C training from {state}/{stopped_at}" in out.stdout
    a, b = _weights(workspace, "straight"), _weights(workspace, "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _curve(workspace, "killed") == _curve(workspace, "straight")


def test_the_loop_reads_the_device_once_per_optimiser_step(workspace, monkeypatch):
    """A device-to-host read stalls a GPU's queue. Counted (`.item()`, `.tolist()`, `float()`, `int()`, `bool()` of
    a tensor): the training loop reads one tensor of the step's numbers per optimiser step, the periodic evaluation
    and checkpoint steps aside, and the model one per forward (its input checks); both loss reductions, with
    gradient accumulation (2 micro-batches of 2 sources: 4 forwards per step)."""
    import cheetah.model.vpgc
    import cheetah.train.vpgc as recipe
    from cheetah.progress import StageBar

    files = {recipe.__file__: "loop", cheetah.model.vpgc.__file__: "model"}
    reads, per_step = {"loop": 0, "model": 0}, []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            where = files.get(sys._getframe(1).f_code.co_filename)
            if where:
                reads[where] += 1
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    update = StageBar.update

    def step_done(self, *args, **kwargs):  # the loop's last call of each step
        per_step.append(dict(reads))
        reads.update(loop=0, model=0)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(StageBar, "update", step_done)
    for reduction in ("sample", "token"):
        per_step.clear()
        _run(workspace, f"syncs-{reduction}", steps=6, eval_every=6, checkpoint_every=6, log_every=6,
             gradient_accumulation=2, loss_reduction=reduction)
        assert len(per_step) == 6 and per_step[1:5] == [{"loop": 1, "model": 4}] * 4, (reduction, per_step)


def test_state_from_other_settings_is_not_resumed(workspace, capsys):
    _run(workspace, "changed", steps=3, checkpoint_every=3)
    _run(workspace, "changed", steps=3, checkpoint_every=3, lr=0.02)
    out = capsys.readouterr().out
    assert "it was written under other settings or data" in out and "starting afresh" in out


def test_state_on_other_backbone_weights_is_not_resumed(workspace, tmp_path, capsys):
    """A base stage that reran writes the same architecture with other weights to the same folder: the finished
    state of the old backbone must not be resumed (it would hand back the old VPG-C weights unchanged)."""
    import shutil

    shutil.copytree(workspace / "backbone", tmp_path / "backbone")
    train = {**_params(tmp_path, "rebased", steps=3, checkpoint_every=3)["train"], "data": str(workspace / "syn")}
    overrides = [f"model.backbone_dir={json.dumps(str(tmp_path / 'backbone'))}"]
    overrides += [f"train.{k}={json.dumps(v)}" for k, v in train.items()]
    train_vpgc(load_params(None, overrides))
    first = load_file(str(tmp_path / "rebased" / "vpgc" / "vpgc.safetensors"))
    save_backbone(build_backbone("tiny", tokenizer=make_tokenizer(), image_size=32, seed=1), tmp_path / "backbone")
    capsys.readouterr()
    train_vpgc(load_params(None, overrides))
    assert "starting afresh" in capsys.readouterr().out
    second = load_file(str(tmp_path / "rebased" / "vpgc" / "vpgc.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_state_written_by_other_training_code_is_not_resumed(workspace, monkeypatch, capsys):
    """DVC reruns `train` when its code changes: the finished state of the old code must not be resumed."""
    import cheetah.train.state as state

    _run(workspace, "recoded", steps=3, checkpoint_every=3)
    _run(workspace, "recoded", steps=3, checkpoint_every=3)
    assert "resuming VPG-C training" in capsys.readouterr().out  # the same code: the finished state is taken
    monkeypatch.setattr(state, "code_digest", lambda paths: "other code")
    _run(workspace, "recoded", steps=3, checkpoint_every=3)
    assert "starting afresh" in capsys.readouterr().out


def test_batches_split_unevenly_unless_a_micro_batch_would_be_empty(workspace):
    from cheetah.train.vpgc import micro_batch_size

    assert micro_batch_size(TrainConfig(synthetic_batch=24, caption_batch=64), world=10) == 9  # 88 over 10 ranks
    with pytest.raises(ValueError, match=r"1 x 6 micro-batches leave some without an example \(at most 5\)"):
        _run(workspace, "empty", synthetic_batch=3, caption_batch=5, gradient_accumulation=6)


def test_random_backbone_trains_at_the_preset_shapes_and_is_marked(workspace):
    """`model.random_backbone`: the preset built in the process (its tokenizer from backbone_dir), trained through
    the same stage; the card says so, for the registry to refuse."""
    from cheetah.model.backbones import PRESETS

    tree = _params(workspace, "random", steps=2, checkpoint_every=2, eval_every=2)
    tree["model"]["random_backbone"] = True
    metrics = train_vpgc(load_params(None, [f"{section}.{k}={json.dumps(v)}" for section, vals in tree.items()
                                            for k, v in vals.items()]))
    card = json.loads((workspace / "random" / "vpgc" / "vpgc.json").read_text())
    assert card["random_backbone"] is True and card["backbone_init"] == "random" and card["backbone"] == "tiny"
    assert card["num_llm_layers"] == PRESETS["tiny"].text["num_hidden_layers"] and metrics["steps"] == 2


def test_a_group_of_one_leaves_the_environment_as_it_found_it(monkeypatch):
    """`distributed.init` in a process no launcher started makes a group of one with the rank variables DeepSpeed
    reads; `shutdown` puts the environment back as it was (a variable set before keeps its value), so a later
    `cheetah train` in the same process, or a process it starts, is not taken for a launched rank."""
    import torch.distributed as dist

    from cheetah.train import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "before")
    before = dict(os.environ)
    assert not distributed.launched()
    assert distributed.init() == (0, 1)
    assert dist.is_initialized() and os.environ["RANK"] == "0" and os.environ["MASTER_ADDR"] == "127.0.0.1"
    distributed.shutdown()
    assert not dist.is_initialized()
    assert dict(os.environ) == before and not distributed.launched()
