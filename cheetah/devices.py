"""Where a stage computes: the device a command may run on (`model.require_gpu` refuses a CPU, or too few GPUs,
before any work starts) and the CPU threads it uses (fixed by each stage's `threads`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from cheetah.config import ConfigError, Params


def check_gpu(params: Params, command: str, device: Any = None, ranks_per_node: int | None = None) -> None:
    """Refuse what `model.require_gpu` forbids: running `command` on a CPU (the real presets' default: a 7B backbone
    on a CPU is days of compute nobody asked for), on `device` when that is not a GPU (`evaluate.device`), or with
    more ranks per node than the node has GPUs."""
    if not params.model.require_gpu:
        return
    allow = "set model.require_gpu=false to run it on a CPU anyway"
    if not torch.cuda.is_available():
        raise ConfigError(f"`cheetah {command}` with model.preset {params.model.preset!r} needs a GPU and none is "
                          f"visible here (model.require_gpu is true, the real presets' default); {allow}")
    if device is not None and torch.device(device).type != "cuda":
        raise ConfigError(f"`cheetah {command}` on {device}: model.require_gpu is true; {allow}")
    if ranks_per_node is not None and ranks_per_node > torch.cuda.device_count():
        raise ConfigError(f"train.launcher starts {ranks_per_node} ranks per node and this node has "
                          f"{torch.cuda.device_count()} GPUs (model.require_gpu: one GPU per rank)")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch on `threads` CPU threads meanwhile (None: as it is), then the previous count. Floating-point sums depend
    on the thread count, so the training and evaluation stages fix it from their parameters: the same parameters
    give the same numbers whatever the core count or OMP_NUM_THREADS say."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
