"""Process-group and DeepSpeed set-up that works the same under `python`, `torchrun` and `deepspeed`.

A plain `python`/`cheetah` process gets the rank variables of a one-process group (DeepSpeed otherwise falls back
to MPI discovery). CPU runs use gloo and DeepSpeed's CPU accelerator; GPU runs use NCCL. `train.launcher` makes a
plain process re-run itself under `torchrun` or `deepspeed` (`relaunch`), which is how `dvc repro` and the Prefect
flow start distributed training. The DeepSpeed config is generated from the `train` settings, and a user's JSON file
(`train.deepspeed_config`) is merged over it (`deepspeed_config`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cheetah.config import ConfigError
from cheetah.errors import EXIT_USER_ERROR, RANK_ERRORS_ENV

# How each launcher is told to run `python -m cheetah.cli` (the arguments then follow unchanged).
LAUNCHERS = {"torchrun": ["-m", "cheetah.cli"], "deepspeed": ["--module", "cheetah.cli"]}


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The rank variables `init` set for a group of one, with the values they had before: `shutdown` puts those back, so
# nothing of a group outlives it (a later `cheetah train` in this process, or a process it starts, is not "launched").
_SET_BY_INIT: dict[str, str | None] = {}


def device() -> torch.device:
    """This rank's device: the GPU of its local rank (refused by name if the node has fewer), else the CPU."""
    if torch.cuda.is_available():
        local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(f"local rank {local_rank} has no GPU of its own: this node shows {count} "
                              "(start at most that many ranks per node, e.g. torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init() -> tuple[int, int]:
    """Join (or create) the process group; returns (rank, world size). A process no launcher started becomes a
    group of one: the rank variables DeepSpeed reads are set until `shutdown`."""
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # not launched by torchrun / deepspeed: a group of one
        values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(_free_port())}
        _SET_BY_INIT.update({k: os.environ.get(k) for k in values})
        os.environ.update(values)
    try:
        if not dist.is_initialized():
            import deepspeed

            if not torch.cuda.is_available():
                # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when it starts (about a minute on
                # 2 cores) that only `inference_all_reduce` (tensor-parallel inference) uses: ZeRO training
                # all-reduces through torch.distributed. Not building it changes no number and no message.
                # (By module name: the package attribute `deepspeed.comm.torch` is torch itself.)
                importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    except BaseException:
        _restore_env()
        raise
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    return dist.get_rank(), dist.get_world_size()


def _restore_env() -> None:
    for key, value in _SET_BY_INIT.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SET_BY_INIT.clear()


def launched() -> bool:
    """Whether this process was started by a launcher (torchrun, deepspeed, ...): it then never relaunches."""
    return "RANK" in os.environ


def local_rank_and_size() -> tuple[int, int]:
    """(rank on this node, processes on this node): torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE."""
    size = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    return int(os.environ.get("LOCAL_RANK", 0)), int(size)


def launcher_command(launcher: str, argv: list[str]) -> list[str]:
    """`train.launcher` + `python -m cheetah.cli <argv>` as the launcher spells it. The launcher's executable is
    taken from this interpreter's environment when it is there (so the same installation runs every rank)."""
    name, parts = _launcher_parts(launcher)
    if name not in LAUNCHERS:
        raise ConfigError(f"train.launcher {launcher!r} must start with one of {sorted(LAUNCHERS)} "
                          "(e.g. `torchrun --nproc_per_node 8` or `deepspeed --hostfile hostfile`)")
    local = Path(sys.executable).with_name(parts[0]) if "/" not in parts[0] else None  # (a path is taken as it is)
    executable = str(local) if local is not None and local.exists() else parts[0]
    return [executable, *parts[1:], *LAUNCHERS[name], *argv]


def _option(parts: list[str], *names: str) -> str | None:
    for i, part in enumerate(parts):
        for name in names:
            if part == name and i + 1 < len(parts):
                return parts[i + 1]
            if part.startswith(name + "="):
                return part.split("=", 1)[1]
    return None


def _launcher_parts(launcher: str) -> tuple[str, list[str]]:
    """(the launcher's program name, its words, with environment variables expanded)."""
    parts = shlex.split(os.path.expandvars(launcher))
    return (Path(parts[0]).name if parts else ""), parts


def launcher_ranks_per_node(launcher: str | None) -> int | None:
    """The processes `train.launcher` starts on each node, where its options say it (None: cannot tell)."""
    if not launcher:
        return 1
    name, parts = _launcher_parts(launcher)
    if name == "torchrun":
        given = _option(parts, "--nproc_per_node", "--nproc-per-node") or "1"
    elif name == "deepspeed":
        given = _option(parts, "--num_gpus")
    else:
        given = None
    return int(given) if given is not None and given.isdigit() else None


def launcher_world_size(launcher: str | None) -> int | None:
    """The number of processes `train.launcher` starts, where its options say it (None: cannot tell, e.g. a
    torchrun node range or a DeepSpeed hostfile that is not here)."""
    if not launcher:
        return 1
    name, parts = _launcher_parts(launcher)
    per_node, nodes = launcher_ranks_per_node(launcher), _option(parts, "--nnodes" if name == "torchrun" else
                                                                 "--num_nodes")
    if name == "torchrun":
        nodes = nodes or "1"
        return per_node * int(nodes) if per_node is not None and nodes.isdigit() else None
    if name == "deepspeed":
        hostfile = _option(parts, "--hostfile", "-H")
        if hostfile is not None and _option(parts, "--num_gpus") is None:
            try:
                slots = [int(_option(line.split(), "slots") or line.split("slots=")[1])
                         for line in Path(hostfile).read_text().splitlines() if "slots=" in line and
                         not line.lstrip().startswith("#")]
            except (OSError, ValueError, IndexError):
                return None
            return sum(slots[: int(nodes)] if nodes and nodes.isdigit() else slots) or None
        if per_node is not None:
            return per_node * (int(nodes) if nodes and nodes.isdigit() else 1)
    return None


def relaunch(launcher: str, argv: list[str]) -> int:
    """Run `cheetah <argv>` under `launcher` and wait; returns the launcher's exit status, or 2 when a rank stopped
    on a `CheetahError` (its one line is printed last, below the launcher's failure report). The processes it
    starts have RANK set, so they run the command instead of launching again. SIGTERM and SIGINT (a cancelled
    Prefect run, Ctrl-C) are passed on to the launcher, which stops its ranks."""
    cmd = launcher_command(launcher, argv)
    print("launching: " + shlex.join(cmd), flush=True)
    with tempfile.TemporaryDirectory(prefix="cheetah-ranks-") as errors:
        proc = subprocess.Popen(cmd, env={**os.environ, RANK_ERRORS_ENV: errors})
        forwarded = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.signal(s, lambda signum, _: proc.send_signal(signum)) for s in forwarded}
        try:
            status = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        reported = sorted(Path(errors).glob("rank-*.txt"))
        if status != 0 and reported:
            rank = int(reported[0].stem.split("-")[1])
            print(f"error: rank {rank}: {reported[0].read_text()}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        return status


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (without an explicit barrier + destroy, 2-rank gloo jobs abort at exit about one time
    in six), and put back the rank variables `init` set for a group of one."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            # DeepSpeed keeps a clone of the world group for its data-parallel group; it would outlive the group it
            # cloned, and the next engine in this process would use it (`Group ... is not registered`).
            from deepspeed.utils import groups

            groups._WORLD_GROUP = None
    finally:
        _restore_env()


def deepspeed_config(*, micro_batch: int, accumulation: int, zero_stage: int, precision: str, grad_clip: float,
                     persist_numel: int, bucket_numel: int | None = None, world: int = 1,
                     user: str | Path | None = None) -> dict[str, Any]:
    """The engine's JSON config, with the user's file (`train.deepspeed_config`) merged over it.

    `persist_numel`: parameters up to this size stay whole under ZeRO-3, so small ones read outside a module's
    forward (the query tokens) are never seen partitioned. `bucket_numel` (the trainable parameters): gradient
    reduction and all-gather buckets of that size. DeepSpeed's default buckets hold 5e8 elements, allocated in every
    step (1 GB in bf16, twice that with overlap_comm) for the 6.3M parameters VPG-C trains."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if bucket_numel:
        zero.update(reduce_bucket_size=bucket_numel, allgather_bucket_size=bucket_numel)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # A torch optimizer: nothing is JIT-compiled, on CPU or GPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=persist_numel,
                                        stage3_gather_16bit_weights_on_model_save=True)
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if user is None:
        return cfg
    decided = {"bf16.enabled": precision == "bf16", "fp16.enabled": precision == "fp16"}
    return merge_user_config(cfg, user, decided)


# DeepSpeed keys that other `train` settings decide: a user's file may repeat them (or say "auto"), not change them.
_DECIDED_BY = {
    "train_micro_batch_size_per_gpu": "train.synthetic_batch + caption_batch over world size x gradient_accumulation",
    "gradient_accumulation_steps": "train.gradient_accumulation",
    "train_batch_size": "train.synthetic_batch + caption_batch",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_allow_untested_optimizer": "the torch AdamW optimiser cheetah trains with",
}
_REFUSED = {"optimizer": "train.lr, weight_decay and betas (a torch AdamW)",
            "scheduler": "train.warmup_steps and schedule"}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if v == "auto":  # Hugging Face's convention: take the generated value
            continue
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_user_config(generated: dict[str, Any], path: str | Path, decided: dict[str, Any]) -> dict[str, Any]:
    """`generated` with the JSON object in `path` merged over it. Where the file sets a key that `train` decides
    (batch sizes, accumulation, ZeRO stage, precision, clipping, the optimiser) to another value, or a ZeRO setting
    DeepSpeed does not know, this raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such DeepSpeed config (train.deepspeed_config)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable JSON file (train.deepspeed_config): {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(user).__name__}")
    for key, why in _REFUSED.items():
        if key in user:
            raise ConfigError(f"{path}: `{key}` cannot be set here: the optimiser and its schedule come from {why}")
    expected = {**_flat(generated), **decided}
    given = _flat(user)
    for key, what in _DECIDED_BY.items():
        if key in given and given[key] != "auto" and given[key] != expected.get(key, False):
            raise ConfigError(f"{path}: {key} is {given[key]!r}, but {what} make it {expected.get(key, False)!r}; "
                              "change the train setting (or remove the key) instead")
    merged = _merge(generated, user)
    from deepspeed.runtime.zero.config import get_zero_config
    from pydantic import ValidationError

    try:
        get_zero_config(merged)
    except ValidationError as e:
        raise ConfigError(f"{path}: zero_optimization: " + "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
    return merged
