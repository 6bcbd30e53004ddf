"""Great Expectations validation of the data sets and benchmark files.

Public API:
    run_suite(suite, path, cfg: ValidateConfig | None = None, docs=True) -> Result      `cheetah validate`
    Result.success, Result.failures, Result.summary(), Result.report_dir
    SUITES = ("source", "synthetic", "demon", "mme")

Per-record problems GX cannot express (undecodable images, paths escaping their folder, placeholder counts,
edit regions) are computed into `*_problem` columns first and asserted with GX expectations, so every problem
is in the GX result, the data docs and the quarantine.
"""

from cheetah.validate.runner import Failure, Result, run_suite
from cheetah.validate.suites import SUITES, Table

__all__ = ["SUITES", "Failure", "Result", "Table", "run_suite"]
