"""What a running stage shows: logging for every command, one progress bar per stage, rates in the log.

`configure_logging` is called once by the CLI (`cheetah --log-level LEVEL`, else `$CHEETAH_LOG_LEVEL`, else INFO):
records of the `cheetah` loggers go to stderr with a timestamp. The handler looks up `sys.stderr` when it writes,
so it follows whatever stderr is at that moment (a terminal, a pipe under DVC or Prefect, pytest's capture).

`stage_bar` is the one tqdm bar of a stage: it counts items (synthetic pairs, evaluation answers), however many
shards, workers or ranks produce them, and when it closes it logs the rate. Under DVC and Prefect the bar's
updates become log lines (the Prefect flow keeps the last state of each `\\r` line and sets `TQDM_MININTERVAL`).
Lines of the form `progress <stage> <done>/<total>` (`progress_line`) are logged for programs that read the
output, such as the Prefect flow's progress artifact.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from tqdm import tqdm

from cheetah.config import ConfigError

LOG_ENV = "CHEETAH_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_PREFIX = "progress"

log = logging.getLogger("cheetah.progress")


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler bound to the current `sys.stderr` at every write, not the one of the moment it was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D401 - logging's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: str | None = None) -> str:
    """Send the `cheetah` loggers to stderr at `level` (else `$CHEETAH_LOG_LEVEL`, else INFO); returns the level.

    Idempotent: calling it again only changes the level. Other libraries' loggers are left as they are."""
    name = (level or os.environ.get(LOG_ENV) or "INFO").upper()
    if name not in LEVELS:
        raise ConfigError(f"log level {name!r} (from {'--log-level' if level else LOG_ENV}) must be one of "
                          f"{', '.join(LEVELS)}")
    logger = logging.getLogger("cheetah")
    logger.setLevel(name)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    return name


def progress_line(stage: str, done: int, total: int) -> str:
    return f"{PROGRESS_PREFIX} {stage} {done}/{total}"


def parse_progress_line(text: str) -> tuple[str, int, int] | None:
    """`(stage, done, total)` from a line that ends with `progress_line(...)` (a log line, say), else None."""
    parts = text.rsplit(f" {PROGRESS_PREFIX} ", 1) if not text.startswith(PROGRESS_PREFIX) else ["", text[len(PROGRESS_PREFIX) + 1:]]
    if len(parts) != 2:
        return None
    stage, _, count = parts[1].strip().rpartition(" ")
    done, _, total = count.partition("/")
    if not stage or not (done.isdigit() and total.isdigit()):
        return None
    return stage, int(done), int(total)


class StageBar:
    """One bar for a stage: thread-safe `update` (Dask's event handler calls it from another thread), progress
    lines in the log every `log_every` seconds, and the rate logged on `close`. `disable=True` (the ranks other
    than 0) shows and logs nothing."""

    def __init__(self, stage: str, total: int, unit: str, initial: int = 0, log_every: float = 30.0,
                 disable: bool = False):
        self.stage, self.unit, self.total = stage, unit, total
        self.initial = initial
        self._lock = threading.Lock()
        # Redirected to a file or a pipe (DVC, Prefect, CI), a bar redrawn every 0.1 s is a line per step: there it
        # is redrawn every `log_every` seconds, beside the progress lines.
        self._bar = tqdm(total=total, initial=initial, desc=stage, unit=f" {unit}", dynamic_ncols=True,
                         disable=disable, file=sys.stderr,
                         mininterval=0.1 if sys.stderr.isatty() else log_every)
        self._started = time.perf_counter()
        self._log_every = log_every
        self._last_log = self._started
        self._closed = False
        self._quiet = disable
        if not self._quiet:
            log.info(progress_line(stage, initial, total))

    def update(self, k: int = 1) -> None:
        with self._lock:
            self._bar.update(k)
            now = time.perf_counter()
            if now - self._last_log >= self._log_every and not self._quiet:
                self._last_log = now
                log.info(progress_line(self.stage, int(self._bar.n), self.total))

    def postfix(self, **values: str) -> None:
        """Show `values` beside the count on the terminal's bar (the progress lines stay counts)."""
        with self._lock:
            self._bar.set_postfix(refresh=False, **values)

    def set(self, done: int) -> None:
        """Set the count (e.g. to the exact total once every shard has reported)."""
        with self._lock:
            self._bar.update(done - self._bar.n)

    def close(self) -> dict[str, Any]:
        """Close the bar and log the count, the time and the rate of the items made in this run."""
        with self._lock:
            self._closed = True
            self._bar.close()
            seconds = time.perf_counter() - self._started
            made = int(self._bar.n) - self.initial
        rate = made / seconds if seconds > 0 else 0.0
        if self._quiet:
            return {"items": made, "seconds": round(seconds, 3), "per_second": round(rate, 3)}
        log.info(progress_line(self.stage, made + self.initial, self.total))
        log.info("%s: %d %s in %.1f s (%.2f %s/s)%s", self.stage, made, self.unit, seconds, rate, self.unit,
                 f"; {self.initial} done before" if self.initial else "")
        return {"items": made, "seconds": round(seconds, 3), "per_second": round(rate, 3)}

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.close()
