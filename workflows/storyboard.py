"""The storyboard folder a story run leaves behind: page PNGs, ``manifest.json``, ``index.html``, a contact sheet.

Other tools read ``manifest.json``; its ``pages[].image`` (a PNG path relative to the folder) is a stable name.
Every file is written under a temporary name and renamed into place, the manifest last, so an interrupted write
never leaves a manifest that points at missing or half-written pages.
"""

from __future__ import annotations

import html
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mgmflow.models.images import load_image

MANIFEST = "manifest.json"
INDEX = "index.html"
CONTACT_SHEET = "contact-sheet.png"
THUMBNAIL = 256  # longest side of a contact-sheet cell, in pixels
LABEL_HEIGHT = 16


def page_filename(page: int) -> str:
    """``page-01.png``: zero-padded so the folder lists in page order (pages are 1..64)."""
    return f"page-{page:02d}.png"


def write_storyboard(
    out_dir: str | Path,
    *,
    pages: Sequence[dict[str, Any]],
    read_png: Callable[[str], bytes],
    header: dict[str, Any],
) -> Path:
    """Write the storyboard of ``pages`` (dicts with ``page``, ``artifact_id``, ``prompt``, ``seed``, ``scores``,
    ``lineage``…) into ``out_dir``; ``read_png(artifact_id)`` returns a page's PNG bytes. Returns the manifest path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(pages, key=lambda page: page["page"])

    # 1. The page images, byte for byte as the worker stored them (they carry their generation parameters).
    entries, thumbnails = [], []
    for page in ordered:
        png = read_png(page["artifact_id"])
        name = page_filename(page["page"])
        _write_atomic(out / name, png)
        entries.append({"image": name, **page})
        thumbnails.append(load_image(png))

    # 2. The views for people: a contact sheet and a static page.
    _write_atomic(out / CONTACT_SHEET, contact_sheet(thumbnails, [entry["page"] for entry in entries]))
    _write_atomic(out / INDEX, render_index(header, entries).encode())

    # 3. The manifest last: its presence means the folder is complete.
    manifest = {**header, "contact_sheet": CONTACT_SHEET, "index": INDEX, "pages": entries}
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    return out / MANIFEST


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[int]) -> bytes:
    """All pages as numbered thumbnails on one PNG, four to a row."""
    columns = min(4, max(1, len(images)))
    rows = max(1, (len(images) + columns - 1) // columns)  # an empty storyboard (every page rejected) is one blank row
    cell = max(
        (min(THUMBNAIL, max(image.size)) for image in images), default=THUMBNAIL
    )
    sheet = Image.new("RGB", (columns * cell, rows * (cell + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        thumb = image.copy()
        thumb.thumbnail((cell, cell))
        x, y = (index % columns) * cell, (index // columns) * (cell + LABEL_HEIGHT)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        draw.text((x + 4, y + cell + 2), f"page {label}", fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def render_index(header: dict[str, Any], entries: Sequence[dict[str, Any]]) -> str:
    """A self-contained HTML page: the premise, then each page with its prompt, seed and scores."""
    esc = html.escape
    figures = "\n".join(
        f'<figure id="page-{entry["page"]}"><img src="{esc(entry["image"])}" alt="page {entry["page"]}">'
        f"<figcaption><b>Page {entry['page']}</b> — {esc(entry.get('scene', ''))}<br>"
        f"<small>prompt: {esc(entry['prompt'])}<br>seed {entry['seed']} · scores "
        f"{esc(', '.join(f'{score:g}' for score in entry['scores']))}</small></figcaption></figure>"
        for entry in entries
    )
    title = esc(str(header.get("title") or "Storyboard"))
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{title}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "main{display:grid;grid-template-columns:repeat(auto-fill,minmax(256px,1fr));gap:16px}"
        "figure{margin:0}img{width:100%;image-rendering:pixelated}"
        "</style></head><body>"
        f"<h1>{title}</h1><p>{esc(str(header.get('premise', '')))}</p>"
        f'<p><img src="{CONTACT_SHEET}" alt="contact sheet" style="max-width:100%"></p>'
        f"<main>\n{figures}\n</main></body></html>\n"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
