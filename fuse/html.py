"""Shared pieces of the self-contained HTML pages (the run report and the triage page).

Every page is one file that opens offline: images are embedded as base64 data URIs, the style
sheet and the little sorting script are inline, and a Content-Security-Policy forbids any network
request. All text that reaches a page goes through `escape` (ids, column names and reasons come
from user data).
"""

from __future__ import annotations

import base64
import html
import io
import math

# Inline style and script only; images from data: URIs only; nothing is fetched.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")

CSS = """
:root { --ink: #1b1f24; --muted: #5b6470; --line: #d9dde3; --flag: #b42318; --flag-bg: #fdf0ee;
        --up: #b42318; --down: #1d6b3a; --head: #f3f5f7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0 auto; padding: 18px 24px 48px; max-width: 1280px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p { margin: 6px 0; }
.muted { color: var(--muted); }
.note { background: #fff8e1; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 8px 0; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 8px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; font-size: 10px; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; font-size: 10px; }
tr.final td { font-weight: 600; background: #eef4ff; }
tr.flagged td { background: var(--flag-bg); }
tr.flagged td:first-child { box-shadow: inset 4px 0 0 var(--flag); }
.badge { display: inline-block; padding: 0 6px; border-radius: 3px; font-size: 12px; font-weight: 600; }
.badge.flag { background: var(--flag); color: #fff; }
.badge.final { background: #2f5eb5; color: #fff; }
.plots { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; flex: 1 1 440px; max-width: 620px; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; max-width: 620px; }
img.thumb { display: block; border-radius: 3px; }
.noimg { display: flex; align-items: center; justify-content: center; text-align: center;
         background: #eceff2; color: var(--muted); font-size: 12px; border-radius: 3px; }
ul.reasons { margin: 0; padding: 0; list-style: none; font-size: 13px; }
ul.reasons .up { color: var(--up); }
ul.reasons .down { color: var(--down); }
.id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
      word-break: break-all; }
section.patient { margin: 14px 0 22px; }
table.lesions.wide { table-layout: fixed; width: 100%; }
table.lesions td { overflow-wrap: anywhere; }
.pid { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
"""

# Click a heading of a `table.sortable` to sort by that column (numbers by `data-sort`).
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, column) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var down = th.getAttribute("aria-sort") !== "descending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", down ? "descending" : "ascending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[column];
        var value = cell.getAttribute("data-sort");
        if (value === null) { return cell.textContent.trim().toLowerCase(); }
        var number = parseFloat(value);
        return isNaN(number) ? -Infinity : number;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var order = x < y ? -1 : (x > y ? 1 : 0);
        return down ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def escape(value) -> str:
    """`value` as text safe inside HTML elements and quoted attributes (None gives "")."""
    if value is None:
        return ""
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    """A `data:` URI embedding `data` (base64)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_data_uri(data: bytes) -> str:
    """A `data:image/png;base64,...` URI for PNG bytes."""
    return data_uri(data, "image/png")


def image_thumbnail(data: bytes, size: int, quality: int = 82) -> bytes:
    """Encoded image bytes (any format PIL reads) downscaled to fit `size` x `size`, as JPEG.

    Raises:
        OSError or ValueError: the bytes are not a readable image (PIL's own errors).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def number(value, fmt: str) -> str:
    """`value` formatted with `fmt`; "n/a" for None, NaN or infinity."""
    if value is None:
        return "n/a"
    try:
        if isinstance(value, float) and not math.isfinite(value):
            return "n/a"
    except TypeError:
        return "n/a"
    return format(value, fmt)


def page(title: str, body: str, *, sortable: bool = False) -> str:
    """A whole HTML document: `title` (escaped here), `body` (HTML, already escaped), the style
    sheet, and the sorting script when `sortable`."""
    script = f"<script>{SORT_JS}</script>\n" if sortable else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n{script}</body>\n</html>\n"
    )

