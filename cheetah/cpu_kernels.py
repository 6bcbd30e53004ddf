"""The same numbers on any x86-64 machine: torch's CPU kernels held to one instruction set.

PyTorch picks its vectorised CPU kernels (ATen), MKL its BLAS code path and oneDNN its primitives by the CPU they
run on: AVX-512 where the CPU has it, AVX2 elsewhere. The paths round differently in the last bits, and thousands of
training steps turn that into other results: the committed base backbone of one 2-core machine was not the one
another produced from the same code (docs/miniature.md point 15). Every `cheetah` command therefore holds all three
to AVX2 — which every x86-64 server and laptop of the last decade has — before torch is imported, unless the user
set them (`ATEN_CPU_CAPABILITY`, `MKL_CBWR`, `ONEDNN_MAX_CPU_ISA`). Other CPUs (ARM) keep their own kernels.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _has_avx2() -> bool:
    try:
        return any(line.startswith("flags") and " avx2" in line
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:  # (not Linux: no way to tell here without a dependency, so nothing is pinned)
        return False


def pin_cpu_kernels() -> dict[str, str]:
    """Set PINNED in the environment where the user has not, on an x86-64 CPU with AVX2, before torch is imported
    (later it would change nothing). Returns what it set; child processes (ranks, DataLoader workers) inherit it."""
    if "torch" in sys.modules or platform.machine().lower() not in ("x86_64", "amd64") or not _has_avx2():
        return {}
    applied = {k: v for k, v in PINNED.items() if k not in os.environ}
    os.environ.update(applied)
    return applied
