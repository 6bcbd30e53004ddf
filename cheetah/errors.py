"""The one base class of every error a user can fix: bad configuration, bad data, weights that do not fit.

The CLI turns a `CheetahError` into one line on stderr and exit code 2, with no traceback; anything else is a
crash (exit 1, with the traceback). The Prefect flow retries crashes, never a `CheetahError` (exit 2). The
subclasses live next to what raises them (`cheetah.config.ConfigError`, `cheetah.io.DataError`, ...); they also
derive from `ValueError` where the Python API raised one before.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

EXIT_USER_ERROR = 2
"""Exit code of a `CheetahError`: the input, configuration or state must change; running again will not help."""


class CheetahError(Exception):
    """Something the user can fix. The message names the file, record and field (or the key) at fault."""


class DivergenceError(CheetahError):
    """Training produced a non-finite loss or gradient (beyond the steps `train.max_skipped_steps` allows)."""


RANK_ERRORS_ENV = "CHEETAH_RANK_ERRORS"
"""A folder the process that starts the ranks (`cheetah.train.distributed.relaunch`) makes: a rank that stops on a
`CheetahError` writes its one line there, so the launcher's exit 1 and failure dump end as exit 2 and that line."""


def record_rank_error(message: str) -> None:
    """Leave `message` for the process that launched this rank, if one asked (`RANK_ERRORS_ENV`)."""
    folder, rank = os.environ.get(RANK_ERRORS_ENV), os.environ.get("RANK")
    if folder and rank is not None:
        with contextlib.suppress(OSError):
            (Path(folder) / f"rank-{int(rank):05d}.txt").write_text(message)
