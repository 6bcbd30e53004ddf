"""Great Expectations Data Docs that render offline, and pictures linked from them.

GX's site builder writes pages that load Bootstrap, jQuery, bootstrap-table (which fills the index's results
table), Font Awesome (the pass/fail icons) and a few others from CDNs, and its logo from S3: offline, the pages
come out unstyled, with an empty index table. `make_offline` copies the vendored files (`static/vendor/`, listed
with their npm source and SHA-256 in `static/vendor.json`) into the site and points every page at them by a
relative path, so a site renders the same from a laptop, a CI artifact or MLflow's artifact store.
"""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
VENDOR_MANIFEST = STATIC / "vendor.json"

# A remote resource a page would load by itself: a script, a stylesheet, an image, a CSS url(...).
_REMOTE = re.compile(r"""(?:<script[^>]*\ssrc|<link[^>]*\shref|<img[^>]*\ssrc)=["'](https?://[^"']+)["']"""
                     r"""|url\(\s*["']?(https?://[^"')\s]+)""", re.IGNORECASE)


# Subresource-integrity attributes of a <script> or <link> tag.
_SRI = re.compile(r"""\s(?:integrity|crossorigin)(?:=(?:"[^"]*"|'[^']*'|[^\s>]+))?""", re.IGNORECASE)
_LOADING_TAG = re.compile(r"<(?:script|link)\b[^>]*>", re.IGNORECASE)


def vendor_manifest() -> dict[str, Any]:
    return json.loads(VENDOR_MANIFEST.read_text(encoding="utf-8"))


def remote_resources(page: str) -> list[str]:
    """URLs a page would fetch on its own when opened (links a reader may click are not counted)."""
    return [a or b for a, b in _REMOTE.findall(page)]


def _drop_tags(page: str, url: str) -> str:
    quoted = re.escape(url)
    page = re.sub(rf"""<script[^>]*\ssrc=["']{quoted}["'][^>]*>\s*</script>\s*""", "", page)
    return re.sub(rf"""<link[^>]*\shref=["']{quoted}["'][^>]*>\s*""", "", page)


def make_offline(site: str | Path) -> list[str]:
    """Rewrite every page of the GX site `site` to load local copies; returns what still points to the network
    (logged; empty for the pages Cheetah's suites produce)."""
    site = Path(site)
    manifest = vendor_manifest()
    shutil.copytree(STATIC / "vendor", site / "static" / "vendor", dirs_exist_ok=True)
    remaining: list[str] = []
    for page_path in sorted(site.rglob("*.html")):
        up = "../" * (len(page_path.relative_to(site).parts) - 1)
        page = page_path.read_text(encoding="utf-8")
        for url in manifest["drop"]:
            page = _drop_tags(page, url)
        if "vegaEmbed(" not in page:  # Vega is only needed to draw a chart, and none is drawn here
            for url in manifest["charts"]:
                page = _drop_tags(page, url)
        for url, local in manifest["local"].items():
            page = re.sub(re.escape(url) + r"""(\?[^"')\s]*)?""", up + local, page)
        # The site's own static folder, at the right depth (GX links the favicon of validation pages one level short).
        page = re.sub(r"""(?<=["'])(?:\.\./)*static/""", up + "static/", page)
        # GX keeps the CDN tags' integrity/crossorigin attributes; on a page opened from file:// Chromium then refuses
        # the local scripts (tabs and modals dead). The vendored copies are pinned by SHA-256 in vendor.json instead.
        page = _LOADING_TAG.sub(lambda tag: _SRI.sub("", tag.group(0)), page)
        page_path.write_text(page, encoding="utf-8")
        remaining += [f"{page_path.relative_to(site)}: {u}" for u in remote_resources(page)]
    if remaining:
        log.warning("%s: %d resource(s) still load from the network: %s", site, len(remaining),
                    ", ".join(remaining[:5]))
    return remaining


def add_pictures(site: str | Path, title: str, folder: str | Path, note: str = "") -> list[str]:
    """Copy the PNGs of `folder` into `site/<folder name>/` and show them at the top of the site's index page,
    under `title`; returns their paths in the site. Nothing happens when `folder` holds no PNG."""
    site, folder = Path(site), Path(folder)
    pictures = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pictures:
        return []
    target = site / folder.name
    target.mkdir(parents=True, exist_ok=True)
    rels = []
    for p in pictures:
        shutil.copyfile(p, target / p.name)
        rels.append(f"{folder.name}/{p.name}")
    _insert_section(site / "index.html", title, rels, note)
    return rels


def _insert_section(index: Path, title: str, pictures: Sequence[str], note: str) -> None:
    """A section of linked thumbnails right after the opening of the index page's main column."""
    items = "".join(
        f'<a class="mr-3 mb-3 d-inline-block text-center" href="{html.escape(rel)}">'
        f'<img src="{html.escape(rel)}" style="max-height:220px" class="border d-block" alt="{html.escape(rel)}">'
        f'{html.escape(Path(rel).stem)}</a>' for rel in pictures)
    section = (f'<div id="cheetah-pictures" class="ge-section container-fluid mb-3 pl-sm-3 px-0">'
               f'<div class="alert alert-secondary"><h3>{html.escape(title)}</h3>'
               f'{f"<p>{html.escape(note)}</p>" if note else ""}{items}</div></div>')
    page = index.read_text(encoding="utf-8")
    anchor = re.search(r'<div id="section-1"', page)
    at = anchor.start() if anchor else page.index("</body>")
    index.write_text(page[:at] + section + page[at:], encoding="utf-8")
