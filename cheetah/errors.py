"""The one base class of every error a user can fix: bad configuration, bad data, weights that do not fit.

The CLI turns a `CheetahError` into one line on stderr and exit code 2, with no traceback; anything else is a
crash (exit 1, with the traceback). The Prefect flow retries crashes, never a `CheetahError` (exit 2). The
subclasses live next to what raises them (`cheetah.config.ConfigError`, `cheetah.io.DataError`, ...); they also
derive from `ValueError` where the Python API raised one before.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
"""Exit code of a `CheetahError`: the input, configuration or state must change; running again will not help."""


class CheetahError(Exception):
    """Something the user can fix. The message names the file, record and field (or the key) at fault."""


class DivergenceError(CheetahError):
    """Training produced a non-finite loss or gradient (beyond the steps `train.max_skipped_steps` allows)."""
