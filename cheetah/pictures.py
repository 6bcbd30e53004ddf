"""Pictures for people: a sheet of rows, each a few images with text beside them, as PNG bytes.

One renderer serves the contact sheets of the synthetic set (`cheetah/synthesize/contact_sheet.py`: original,
edited, instruction, response) and the qualitative examples of the evaluation report
(`cheetah/evaluate/examples.py`: the images, the prompt, the truth and each model's answer). Small images are
enlarged with nearest-neighbour sampling, so the 64-pixel world stays sharp; an optional box marks a region (the
edited one). The PNG carries no metadata, so the same inputs always give the same bytes (DVC sees no change).
"""

from __future__ import annotations

import dataclasses
import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from cheetah.io import DataError

Box = tuple[int, int, int, int]

_PAD = 10
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_LABEL = (30, 90, 170)
_MUTED = (110, 110, 110)
_BOX = (255, 0, 170)


@dataclasses.dataclass(frozen=True)
class SheetRow:
    """One row of a sheet: images left to right (each with a caption under it), then labelled text."""

    images: tuple[Path, ...]
    captions: tuple[str, ...] = ()
    text: tuple[tuple[str, str], ...] = ()
    """(label, text) pairs, e.g. ("Instruction", "..."), shown right of the images."""
    boxes: tuple[Box | None, ...] = ()
    """A rectangle [x0, y0, x1, y1) in each image's own pixels to outline (None: none)."""


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _thumbnail(path: Path, size: int, box: Box | None) -> Image.Image:
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read for a picture ({e})") from None
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BICUBIC
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    if box is not None:
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        ImageDraw.Draw(shown).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=_BOX, width=2)
    return shown


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Lines of `text` no wider than `width` pixels (words longer than a line are cut)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if font.getlength(trial) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width:  # a very long token: hard-wrap it
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def render_sheet(title: str, rows: Sequence[SheetRow], thumb: int = 128, text_width: int = 560,
                 note: str = "") -> bytes:
    """A PNG of `rows` under `title` (and a one-line `note`): images `thumb` pixels on their long side, text
    wrapped at `text_width` pixels."""
    font, small, big = _font(14), _font(12), _font(20)
    line_h, small_h = 18, 16
    columns = max([len(r.images) for r in rows] + [1])
    text_x = _PAD + columns * (thumb + _PAD) + _PAD
    width = text_x + text_width + _PAD

    laid_out = []
    for row in rows:
        text_lines: list[tuple[str, tuple[int, int, int], ImageFont.FreeTypeFont | ImageFont.ImageFont]] = []
        for label, text in row.text:
            text_lines.append((label, _LABEL, small))
            text_lines += [(line, _INK, font) for line in _wrap(text, font, text_width)]
        text_h = sum(small_h if f is small else line_h for _, _, f in text_lines)
        caption_h = small_h * max([len(_wrap(c, small, thumb)) for c in row.captions] + [0])
        laid_out.append((row, text_lines, max(thumb + caption_h, text_h) + 2 * _PAD))

    header = _PAD + 28 + (small_h if note else 0) + _PAD
    sheet = Image.new("RGB", (width, header + sum(h for _, _, h in laid_out)), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, _PAD), title, fill=_INK, font=big)
    if note:
        draw.text((_PAD, _PAD + 28), note, fill=_MUTED, font=small)
    y = header
    for row, text_lines, height in laid_out:
        draw.line([(0, y), (width, y)], fill=(220, 220, 220))
        for k, path in enumerate(row.images):
            x = _PAD + k * (thumb + _PAD)
            image = _thumbnail(path, thumb, row.boxes[k] if k < len(row.boxes) else None)
            sheet.paste(image, (x + (thumb - image.width) // 2, y + _PAD + (thumb - image.height) // 2))
            if k < len(row.captions):
                for j, line in enumerate(_wrap(row.captions[k], small, thumb)):
                    draw.text((x, y + _PAD + thumb + 2 + j * small_h), line, fill=_MUTED, font=small)
        ty = y + _PAD
        for line, colour, f in text_lines:
            draw.text((text_x, ty), line, fill=colour, font=f)
            ty += small_h if f is small else line_h
        y += height
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with an ellipsis (prompts of real benchmarks run to pages)."""
    return text if len(text) <= limit else textwrap.shorten(text, limit, placeholder=" …") or text[:limit] + " …"
