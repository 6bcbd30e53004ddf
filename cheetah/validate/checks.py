"""Per-record checks that Great Expectations cannot express directly, computed into columns first.

Each check returns None when the value is fine (or does not apply) and a short message naming the field when
it is not; the record formats' own checks (`cheetah.formats`, which the loaders use too) are not repeated
here. The suites store these in `*_problem` columns and assert them with `expect_column_values_to_be_null`,
so every problem shows in the GX result, the data docs and the quarantine, with the record it belongs to.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from cheetah.io import DataError, safe_join

DEMON_PLACEHOLDER = re.compile(r"\{(?:image|table)#(\d+)\}")


class Images:
    """Checks image references under one root folder; each file is opened once however often it is named."""

    def __init__(self, root: Path, expected_size: int | None = None):
        self.root = Path(root)
        self.expected = expected_size
        self._cache: dict[Path, tuple[int, int] | str] = {}

    def path_problem(self, rel: Any, field: str) -> str | None:
        """Absolute or escaping (`../`, symlinks out) paths; None if `rel` is not a string (types are checked apart)."""
        if not isinstance(rel, str):
            return None
        try:
            safe_join(self.root, rel, what=f"{field}")
        except DataError as e:
            return str(e)
        return None

    def _open(self, full: Path) -> tuple[int, int] | str:
        if full not in self._cache:
            try:
                with Image.open(full) as im:
                    im.load()  # decode the pixels: a truncated or corrupt file fails here, not at training time
                    self._cache[full] = im.size
            except Exception as e:  # PIL raises many types for corrupt files
                self._cache[full] = f"cannot be decoded ({type(e).__name__}: {e})"
        return self._cache[full]

    def size(self, rel: Any) -> tuple[int, int] | None:
        """The (width, height) of a safe, existing, decodable image, else None."""
        if not isinstance(rel, str) or self.path_problem(rel, "") is not None:
            return None
        full = safe_join(self.root, rel)
        if not full.is_file():
            return None
        got = self._open(full)
        return got if isinstance(got, tuple) else None

    def file_problem(self, rel: Any, field: str, expected: tuple[int, int] | None = None) -> str | None:
        """Missing, undecodable or wrongly sized; None for paths already rejected by `path_problem`."""
        if not isinstance(rel, str) or self.path_problem(rel, field) is not None:
            return None
        full = safe_join(self.root, rel)
        if not full.is_file():
            return f"{field}: {rel} does not exist"
        got = self._open(full)
        if isinstance(got, str):
            return f"{field}: {rel} {got}"
        if expected is not None and got != expected:
            return f"{field}: {rel} is {got[0]}x{got[1]}, expected {expected[0]}x{expected[1]}"
        return None


def common_size(images: Images, refs: list[Any]) -> tuple[int, int] | None:
    """The configured size, or else the size most of the referenced images have (the set must be uniform)."""
    if images.expected is not None:
        return images.expected, images.expected
    sizes = Counter(s for s in (images.size(r) for r in refs) if s is not None)
    return sizes.most_common(1)[0][0] if sizes else None


def joined(problems: list[str | None]) -> str | None:
    found = [p for p in problems if p]
    return "; ".join(found) if found else None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def edit_problem(edit: Any, size: tuple[int, int] | None) -> str | None:
    """The structured edit description: fields, their types, before/after per type, and a region in the image."""
    if not isinstance(edit, dict):
        return None  # the type expectation reports it
    missing = [k for k in ("type", "object", "before", "after", "region") if k not in edit]
    if missing:
        return f"edit has no field {missing[0]}"
    if not isinstance(edit["object"], str) or not edit["object"].strip():
        return "edit.object must be a non-empty string"
    for key in ("before", "after"):
        if edit[key] is not None and not isinstance(edit[key], dict):
            return f"edit.{key} must be an object or null"
    if edit["type"] == "add" and edit["before"] is not None:
        return "edit.before must be null for an add edit (the object is new)"
    if edit["type"] == "delete" and edit["after"] is not None:
        return "edit.after must be null for a delete edit (the object is gone)"
    if edit["type"] in ("modify", "swap") and (edit["before"] is None or edit["after"] is None):
        return f"edit.before and edit.after must both be set for a {edit['type']} edit"
    region = edit["region"]
    if not isinstance(region, list) or len(region) != 4 or not all(_int(v) for v in region):
        return f"edit.region must be 4 integers [x0, y0, x1, y1], got {region!r}"
    x0, y0, x1, y1 = region
    if not (x0 < x1 and y0 < y1) or min(region) < 0:
        return f"edit.region {region} is empty or negative"
    if size is not None and (x1 > size[0] or y1 > size[1]):
        return f"edit.region {region} extends past the {size[0]}x{size[1]} image"
    return None


def demon_placeholder_problem(context: Any, choices: Any, images: Any) -> str | None:
    """DEMON contexts (and choice lists) must name every image once as {image#k} or {table#k}, k = 1..n."""
    if not isinstance(context, str) or not isinstance(images, list):
        return None
    text = context + (" ".join(c for c in choices if isinstance(c, str)) if isinstance(choices, list) else "")
    named = sorted({int(k) for k in DEMON_PLACEHOLDER.findall(text)})
    if named != list(range(1, len(images) + 1)):
        return f"context names images {named} but images_path has {len(images)}"
    return None
