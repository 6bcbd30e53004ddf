"""Running a suite with Great Expectations: results, a readable summary, quarantine and data docs.

Everything runs in an ephemeral GX context (no project folder, nothing sent anywhere) with progress bars off.
A run writes its report folder atomically:

    <docs_dir>/<suite>/          when every expectation passed (replaces the previous passing report)
    <docs_dir>/<suite>-failed/   when something failed (the last passing report is left as it was)
        index.html ...           GX data docs (GX's own site builder), made to render offline: the scripts and
                                 styles GX loads from CDNs are local copies (cheetah/validate/docs.py)
        contact_sheet/           synthetic suite: the set's contact sheets, shown at the top of index.html
        result.json              the outcome: failed expectations with example rows, counts
        quarantine.jsonl         every record that failed an expectation, with the reasons and the record

The expectations are the GX suites in `expectations/<suite>-<table>.json` (one definition, diffable); bounds from
`params.yaml` fill their suite parameters (`suite_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, get_args

from cheetah.config import ValidateConfig
from cheetah.evaluate.demon import Split
from cheetah.io import DataError, atomic_dir, remove_output
from cheetah.validate.docs import add_pictures, make_offline
from cheetah.validate.suites import BUILDERS, SUITES, Table
from cheetah.world.language import EDIT_TYPES

_MAX_VALUE_CHARS = 120
EXPECTATIONS = Path(__file__).parent / "expectations"
"""The GX expectation suites, one JSON file per table: `<suite>-<table>.json` (`Table.suite_name`)."""


def suite_parameters(cfg: ValidateConfig) -> dict[str, Any]:
    """The values of the `{"$PARAMETER": name}` placeholders in the suite files: configured bounds, and the
    constants whose one definition is in code."""
    return {"max_text_chars": cfg.max_text_chars, "balance_tolerance": cfg.balance_tolerance,
            "edit_types": list(EDIT_TYPES), "demon_splits": list(get_args(Split))}


def load_expectations(name: str) -> list[dict[str, Any]]:
    """The expectation configurations of the suite file `name` (a DataError names a missing or broken file)."""
    path = EXPECTATIONS / f"{name}.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        expectations = spec["expectations"]
        if spec.get("name") != name or not isinstance(expectations, list):
            raise ValueError(f"expected name {name!r} and a list of expectations")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a Great Expectations suite file ({e})") from None
    return expectations


@dataclasses.dataclass
class Failure:
    """One failed expectation: where, what, how many rows, and a few of them."""

    table: str
    expectation: str
    column: str | None
    unexpected: int
    examples: list[str]

    def title(self) -> str:
        on = f"({self.column})" if self.column else ""
        return f"{self.table}: {self.expectation}{on}: {self.unexpected} bad row(s)"


@dataclasses.dataclass
class Result:
    suite: str
    path: str
    success: bool
    evaluated: int
    failures: list[Failure]
    rows: dict[str, int]
    quarantined: int
    report_dir: str | None

    def summary(self) -> str:
        records = sum(self.rows.values())
        head = (f"validate {self.suite} {self.path}: {'passed' if self.success else 'FAILED'} — "
                f"{len(self.failures)} of {self.evaluated} expectations failed; "
                f"{self.quarantined} of {records} records quarantined")
        lines = [head]
        for f in self.failures:
            lines.append(f"  x {f.title()}")
            lines += [f"      {e}" for e in f.examples]
        if self.report_dir:
            lines.append(f"report: {self.report_dir} (index.html: data docs; quarantine.jsonl; result.json)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _plain(value: Any) -> Any:
    """numpy scalars (pandas hands them back) as plain Python values, so messages read 0.25, not np.float64(0.25)."""
    return value.item() if hasattr(value, "item") and hasattr(value, "dtype") else value


def _short(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _reason(kind: str, kwargs: dict[str, Any], column: str | None, value: Any) -> str:
    """Why one row failed one expectation, in words."""
    if column and column.endswith("_problem"):
        return str(value)  # the check already wrote a message naming the field
    phrases = {
        "expect_column_values_to_not_be_null": "is missing",
        "expect_column_values_to_be_of_type": f"must be of type {kwargs.get('type_')}",
        "expect_column_values_to_be_in_type_list": f"must be one of the types {kwargs.get('type_list')}",
        "expect_column_values_to_be_unique": "is duplicated",
        "expect_column_values_to_match_regex": "is blank",
        "expect_column_value_lengths_to_be_between":
            f"must have {kwargs.get('min_value')} to {kwargs.get('max_value')} characters",
        "expect_column_values_to_be_in_set": f"must be one of {kwargs.get('value_set')}",
        "expect_column_values_to_be_between":
            f"must be between {kwargs.get('min_value')} and {kwargs.get('max_value')}",
    }
    return f"{column} {phrases.get(kind, 'fails ' + kind)} (got {_short(value)})"


def _context() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return ctx


def _build_docs(ctx: Any, folder: Path) -> None:
    """GX data docs of every validation this context ran, as a static site in `folder` that renders offline."""
    ctx.add_data_docs_site(site_name="cheetah", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "show_how_to_buttons": False},
    })
    ctx.build_data_docs(site_names=["cheetah"])
    make_offline(folder)


def _validate(ctx: Any, suite: str, k: int, table: Table, cfg: ValidateConfig) -> Any:
    import great_expectations as gx

    name = table.suite_name(suite)
    expectations = load_expectations(name)
    named = {e.get("kwargs", {}).get("column") for e in expectations} - {None}
    missing = sorted(named - set(table.frame.columns))
    if missing:  # a suite file out of step with the code that builds its table
        raise DataError(f"{EXPECTATIONS / f'{name}.json'}: columns {missing} are not in the {table.name!r} table")
    batch = ctx.data_sources.add_pandas(f"{suite}-{k}").add_dataframe_asset(name) \
        .add_batch_definition_whole_dataframe("all_rows")
    gx_suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=gx_suite))
    return definition.run(
        batch_parameters={"dataframe": table.frame},
        expectation_parameters=suite_parameters(cfg),
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": list(table.index_columns)},
    )


def _collect(table: Table, gx_result: Any, max_examples: int,
             bad_rows: dict[str, list[str]]) -> tuple[int, list[Failure]]:
    failures = []
    for r in gx_result.results:
        if r.success:
            continue
        conf = r.expectation_config
        kind, kwargs = conf.type, dict(conf.kwargs)
        column = kwargs.get("column")
        info = r.exception_info or {}
        if info.get("raised_exception"):
            failures.append(Failure(table.name, kind, column, 0, [f"GX raised: {info.get('exception_message')}"]))
            continue
        entries = r.result.get("unexpected_index_list") or []
        examples = []
        for entry in entries:
            where = entry.get(table.index_columns[0])
            reason = _reason(kind, kwargs, column, entry.get(column))
            if table.records is not None:
                bad_rows.setdefault(where, []).append(reason)
                line = f"{where} (id {entry.get('id')!r}): {reason}"
            else:
                line = f"{', '.join(f'{c}={_plain(entry.get(c))!r}' for c in table.index_columns)}: {reason}"
            if len(examples) < max_examples:
                examples.append(line)
        if not entries:  # table-level expectations (e.g. the row count) have an observed value instead
            examples.append(f"observed {r.result.get('observed_value')!r}; expected {kwargs}")
        failures.append(Failure(table.name, kind, column, int(r.result.get("unexpected_count") or 0), examples))
    return len(gx_result.results), failures


def run_suite(suite: str, path: str | Path, cfg: ValidateConfig | None = None, docs: bool = True) -> Result:
    """Validate `path` with `suite` (source, synthetic, demon or mme) and write the report folder.

    Returns the Result (its `summary()` is what the CLI prints). Missing top-level files raise DataError;
    everything about individual records is reported through the expectations instead.
    """
    cfg = cfg or ValidateConfig()
    if suite not in BUILDERS:
        raise DataError(f"unknown suite {suite!r}; choose one of {list(SUITES)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    tables = BUILDERS[suite](path, cfg)

    ctx = _context()
    evaluated, failures = 0, []
    bad_rows: dict[str, list[str]] = {}
    quarantine = []
    for k, table in enumerate(tables):
        n, fails = _collect(table, _validate(ctx, suite, k, table, cfg), cfg.max_examples, bad_rows)
        evaluated += n
        failures += fails
        if table.records is not None:
            for where, rid, record in zip(table.frame["_where"], table.frame["id"], table.records):
                if where in bad_rows:
                    quarantine.append({"table": table.name, "where": where, "id": rid,
                                       "reasons": bad_rows.pop(where), "record": record})

    success = not failures
    docs_root = Path(cfg.docs_dir)
    final = docs_root / (suite if success else f"{suite}-failed")
    result = Result(suite=suite, path=str(path), success=success, evaluated=evaluated, failures=failures,
                    rows={t.name: len(t.frame) for t in tables if t.records is not None},
                    quarantined=len(quarantine), report_dir=str(final))
    with atomic_dir(final, kind="data docs", protect=[path]) as tmp:
        if docs:
            _build_docs(ctx, tmp)
            if suite == "synthetic":
                from cheetah.synthesize.contact_sheet import SHEETS_DIR

                add_pictures(tmp, "Contact sheets", path / SHEETS_DIR,
                             "A few pairs of each edit type (original, edited, instruction, response), as the "
                             "synthesis stage drew them from the validated set.")
        (tmp / "quarantine.jsonl").write_text(
            "".join(json.dumps(q, ensure_ascii=False, default=str) + "\n" for q in quarantine), encoding="utf-8")
        (tmp / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n",
                                         encoding="utf-8")
    if success:
        remove_output(docs_root / f"{suite}-failed", "data docs")  # the failure it recorded is fixed
    return result
