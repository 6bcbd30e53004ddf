"""Process-group and DeepSpeed set-up that works the same under `python`, `torchrun` and `deepspeed`.

A plain `python`/`cheetah` process gets the rank variables of a one-process group (DeepSpeed otherwise falls back
to MPI discovery). CPU runs use gloo and DeepSpeed's CPU accelerator; GPU runs use NCCL.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import torch


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init() -> tuple[int, int]:
    """Join (or create) the process group; returns (rank, world size)."""
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # not launched by torchrun / deepspeed: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Without an explicit barrier + destroy, 2-rank gloo jobs abort at exit about one time in six."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def deepspeed_config(*, micro_batch: int, accumulation: int, zero_stage: int, precision: str, grad_clip: float,
                     persist_numel: int) -> dict[str, Any]:
    """The engine's JSON config. `persist_numel`: parameters up to this size stay whole under ZeRO-3, so small
    ones read outside a module's forward (the query tokens) are never seen partitioned."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
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
    return cfg
