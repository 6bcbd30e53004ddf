"""Contact sheets of a synthetic set: for each edit type, a few pairs as a person would check them.

`write_contact_sheets(folder)` reads a finished synthetic set (`synthetic.jsonl` and its images) and writes
`<folder>/contact_sheet/<edit type>.png`: one row per pair, the original and the edited image (the edited region
outlined), the instruction and the response. The pairs shown are the first `per_type` of each type in file order,
not a selection of good ones. The synthesis stage calls it on the folder it is about to publish, so the sheets are
part of the set (and of its manifest), logged to MLflow with it and shown at the top of the set's Data Docs.
"""

from __future__ import annotations

from pathlib import Path

from cheetah.formats import SYNTHETIC_PAIRS, iter_jsonl
from cheetah.io import safe_join
from cheetah.pictures import SheetRow, render_sheet

SHEETS_DIR = "contact_sheet"
"""Folder of the sheets inside the synthetic set."""
PER_TYPE = 6


def contact_rows(folder: str | Path, per_type: int = PER_TYPE) -> tuple[dict[str, list[SheetRow]], dict[str, int]]:
    """({edit type: rows of its first `per_type` pairs}, {edit type: number of pairs}) of `folder/synthetic.jsonl`,
    types in order of first appearance."""
    folder = Path(folder)
    pairs = folder / SYNTHETIC_PAIRS
    by_type: dict[str, list[SheetRow]] = {}
    counts: dict[str, int] = {}
    for lineno, rec in iter_jsonl(pairs):
        edit = rec["edit"]
        kind = edit["type"]
        counts[kind] = counts.get(kind, 0) + 1
        rows = by_type.setdefault(kind, [])
        if len(rows) >= per_type:
            continue
        where = f"{pairs}:{lineno}: images"
        original, edited = (safe_join(folder, p, what=where) for p in rec["images"])
        region = tuple(edit["region"])
        rows.append(SheetRow(
            images=(original, edited),
            captions=(f"original ({rec.get('source_id')})", f"edited ({rec['id']})"),
            text=(("Instruction", rec["instruction"]), ("Response", rec["response"]),
                  ("Edit", f"{kind} {edit['object']}")),
            boxes=(region, region)))
    return by_type, counts


def write_contact_sheets(folder: str | Path, per_type: int = PER_TYPE) -> list[Path]:
    """One sheet per edit type present in `folder/synthetic.jsonl`; returns them."""
    folder = Path(folder)
    by_type, counts = contact_rows(folder, per_type)
    out = folder / SHEETS_DIR
    out.mkdir(exist_ok=True)
    written = []
    for kind, rows in by_type.items():
        png = render_sheet(f"Synthetic pairs: {kind} ({len(rows)} of {counts[kind]})", rows,
                           note="the first pairs of this edit type in synthetic.jsonl; the edited region is outlined")
        path = out / f"{kind}.png"
        path.write_bytes(png)
        written.append(path)
    return written
