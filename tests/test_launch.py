"""Launching and configuring distributed training without starting it: the argument DeepSpeed's launcher appends,
`train.launcher` (the command a plain process re-runs itself under, its world size), and a user's DeepSpeed config
merged over the generated one, with clear errors where they disagree. (The launchers themselves run in
tests/test_train.py and tests/test_scale_pipeline.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cheetah.cli import build_parser, main
from cheetah.config import ConfigError
from cheetah.train import distributed

VICUNA = Path(__file__).resolve().parents[1] / "configs" / "vicuna-7b.yaml"


def test_every_command_accepts_the_local_rank_deepspeeds_launcher_appends(monkeypatch, capsys):
    parser = build_parser()
    for argv in (["train", "--local_rank=1"], ["--local_rank", "0", "train"], ["evaluate", "--local-rank=3"],
                 ["model", "summary", "--local_rank=0"]):
        parser.parse_args(argv)  # (exits 2 on an unknown argument)
    monkeypatch.setenv("LOCAL_RANK", "0")  # (recorded, so the test leaves the environment as it found it)
    monkeypatch.delenv("LOCAL_RANK")
    assert main(["--params", str(VICUNA), "train", "--plan", "--local_rank=1"]) == 0
    assert os.environ["LOCAL_RANK"] == "1"
    plan = json.loads(capsys.readouterr().out)  # (meta device: no weights needed, nothing allocated)
    assert plan["world_size"] == 8 and plan["micro_batch_per_rank"]["synthetic"] == 3  # from train.launcher
    assert plan["precision"] == "bf16" and plan["gradient_checkpointing"] is True  # the paper's recipe
    assert 14 < plan["per_rank_gb"]["total"] < 24


def test_launcher_command_and_world_size(tmp_path, monkeypatch):
    torchrun = distributed.launcher_command("torchrun --standalone --nproc_per_node 8", ["--params", "p.yaml", "train"])
    assert torchrun[1:] == ["--standalone", "--nproc_per_node", "8", "-m", "cheetah.cli", "--params", "p.yaml",
                            "train"]
    assert torchrun[0] == str(Path(sys.executable).with_name("torchrun"))  # this installation's
    monkeypatch.setenv("HOSTS", "hostfile")
    deepspeed = distributed.launcher_command("deepspeed --hostfile $HOSTS", ["train"])
    assert deepspeed[1:] == ["--hostfile", "hostfile", "--module", "cheetah.cli", "train"]
    with pytest.raises(ConfigError, match="must start with one of"):
        distributed.launcher_command("mpirun -n 2", ["train"])
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode1 slots=4\nnode2 slots=4\n")
    assert [distributed.launcher_world_size(x) for x in (
        None, "torchrun --nproc_per_node 8", "torchrun --nnodes 2 --nproc-per-node=4", "torchrun --nnodes 1:2",
        "deepspeed --num_gpus 2", f"deepspeed --hostfile {hostfile}", f"deepspeed -H {hostfile} --num_nodes 1",
        "deepspeed --hostfile /nowhere")] == [1, 8, 8, None, 2, 8, 4, None]


def test_a_launcher_whose_ranks_cannot_split_the_batch_fails_once_before_launching(capsys):
    # 24 + 64 over 16 ranks split unevenly; over 128, some ranks would get no example: refused by the parent
    # process (exit 2), no launcher started.
    code = main(["--params", str(VICUNA), "--set", "train.launcher=torchrun --nnodes 16 "
                 "--nproc_per_node 8", "train"])
    assert code == 2 and "world size x gradient_accumulation = 128 x 1 micro-batches leave some without an " \
        "example (at most 64)" in capsys.readouterr().err


def _generated(**kw):
    args = dict(micro_batch=8, accumulation=2, zero_stage=2, precision="bf16", grad_clip=1.0, persist_numel=10,
                bucket_numel=1000, world=4)
    return distributed.deepspeed_config(**{**args, **kw})


def test_user_deepspeed_config_is_merged_and_disagreements_are_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "overlap_comm": True},
                                "train_batch_size": 64, "bf16": {"enabled": "auto"}, "steps_per_print": 10}))
    merged = _generated(user=path)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "allgather_bucket_size": 1000,
                                           "offload_optimizer": {"device": "cpu"}, "overlap_comm": True}
    assert merged["bf16"] == {"enabled": True} and merged["steps_per_print"] == 10
    assert merged["train_batch_size"] == 8 * 2 * 4
    for user, message in [
        ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage is 3, but train.zero_stage make it 2"),
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu is 4"),
        ({"gradient_accumulation_steps": 1}, "train.gradient_accumulation"),
        ({"train_batch_size": 32}, "train_batch_size is 32"),
        ({"fp16": {"enabled": True}}, r"fp16.enabled is True, but train.precision make it False"),
        ({"gradient_clipping": 0.5}, "train.grad_clip"),
        ({"optimizer": {"type": "Adam"}}, "`optimizer` cannot be set here"),
        ({"zero_optimization": {"no_such_setting": 1}}, "zero_optimization: no_such_setting"),
        ([1, 2], "must be a JSON object"),
    ]:
        path.write_text(json.dumps(user))
        with pytest.raises(ConfigError, match=message):
            _generated(user=path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{path}: not a readable JSON file"):
        _generated(user=path)
    with pytest.raises(ConfigError, match="no such DeepSpeed config"):
        _generated(user=tmp_path / "missing.json")
    assert "bf16" not in _generated(precision="fp32")


def test_a_real_preset_refuses_the_cpu_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    """`model.require_gpu` (the real presets' default): no GPU here, so `train` and `evaluate` stop at once with one
    line naming the setting, before the launcher starts 8 ranks and before anything is written."""
    monkeypatch.chdir(tmp_path)
    for command in ("train", "evaluate"):
        assert main(["--params", str(VICUNA), command]) == 2
        out, err = capsys.readouterr()
        assert "launching" not in out and err.count("\n") == 1
        assert f"`cheetah {command}` with model.preset 'vicuna-7b' needs a GPU" in err
        assert "set model.require_gpu=false to run it on a CPU anyway" in err
    assert list(tmp_path.iterdir()) == []


def test_the_inputs_are_checked_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    allow = ["--set", "model.require_gpu=false"]
    assert main(["--params", str(VICUNA), *allow, "train"]) == 2
    assert capsys.readouterr().err == ("error: data/synthetic-cc3m/synthetic.jsonl: not found (train.data must be a "
                                       "folder `cheetah synthesize` wrote)\n")
    data = tmp_path / "data" / "synthetic-cc3m"
    data.mkdir(parents=True)
    for name in ("synthetic.jsonl", "captions.jsonl"):
        (data / name).write_text("")
    assert main(["--params", str(VICUNA), *allow, "--set", "model.backbone_dir=nowhere", "train"]) == 2
    assert capsys.readouterr().err == "error: nowhere: backbone directory not found (model.backbone_dir)\n"


def test_ranks_per_node_of_a_launcher():
    assert [distributed.launcher_ranks_per_node(x) for x in (
        None, "torchrun --standalone", "torchrun --nnodes 2 --nproc-per-node=4", "torchrun --nproc_per_node gpu",
        "deepspeed --num_gpus 2", "deepspeed --hostfile h")] == [1, 1, 4, None, 2, None]


def test_a_ranks_one_line_error_is_the_launchers_exit_2_and_last_line(tmp_path, monkeypatch, capfd):
    """What only a rank can find ends as exit 2 and that rank's one line below the launcher's failure report, not as
    the launcher's exit 1. Both halves: a rank's `cheetah` leaves its line where the launching process asked
    (`CHEETAH_RANK_ERRORS`), and `relaunch` turns a failed launcher with such a line into exit 2 and the line (here
    under a stand-in `torchrun` that runs the command as rank 1 and fails as torchrun does)."""
    from cheetah.errors import RANK_ERRORS_ENV

    errors = tmp_path / "errors"
    errors.mkdir()
    monkeypatch.setenv(RANK_ERRORS_ENV, str(errors))
    monkeypatch.setenv("RANK", "3")
    assert main(["--set", "train.data=nowhere", "train"]) == 2
    assert (errors / "rank-00003.txt").read_text() == capfd.readouterr().err.removeprefix("error: ").rstrip("\n")
    monkeypatch.delenv(RANK_ERRORS_ENV)
    monkeypatch.delenv("RANK")

    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n"
                    'shift 2  # --nproc_per_node 2\n'
                    f'RANK=1 {sys.executable} "$@" >/dev/null 2>&1\n'
                    'echo "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ..." >&2\n'
                    "exit 1\n")
    fake.chmod(0o755)
    status = distributed.relaunch(f"{fake} --nproc_per_node 2",
                                  ["--set", "train.data=nowhere", "--set", "model.backbone_dir=nowhere", "train"])
    assert status == 2
    err = capfd.readouterr().err.rstrip("\n").splitlines()
    assert err[-1].startswith("error: rank 1: nowhere/synthetic.jsonl: not found") and "ChildFailedError" in err[-2]


@pytest.mark.skipif(not __import__("cheetah.cpu_kernels", fromlist=["_has_avx2"])._has_avx2(),
                    reason="an x86-64 CPU with AVX2 (elsewhere nothing is pinned)")
def test_every_command_holds_torchs_cpu_kernels_to_avx2_unless_the_user_chose():
    """The same numbers on any x86-64 machine: ATen, MKL and oneDNN on their AVX2 paths whatever the CPU offers
    beyond (AVX-512 rounds differently), set before torch is imported; a user's own choice is kept."""
    from cheetah.cpu_kernels import PINNED

    code = ("import json, os; from cheetah.cpu_kernels import pin_cpu_kernels; pin_cpu_kernels(); import torch; "
            "print(json.dumps([torch.backends.cpu.get_cpu_capability(), {k: os.environ[k] for k in %r}]))"
            % sorted(PINNED))
    clean = {k: v for k, v in os.environ.items() if k not in PINNED}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                                                "ONEDNN_MAX_CPU_ISA": "AVX2"}]
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "ATEN_CPU_CAPABILITY": "default"},
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)[0] == "DEFAULT"
