"""Shared pieces of the self-contained HTML pages (the run report and the triage page).

Every page is one file that opens offline: images are embedded as base64 data URIs, the style
sheet and the little sorting script are inline, and a Content-Security-Policy forbids any network
request. The pages are Jinja2 templates in `fuse/pages/templates/` (`base.html` holds the shared
head: CSP, style, sorting script); `render` fills one with plain values. Autoescaping is on for
every `.html` template, so text from user data (ids, column names, reasons) is escaped by the
engine, never by hand.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import re

import jinja2

__all__ = [
    "CSP",
    "code_segments",
    "data_uri",
    "environment",
    "image_thumbnail",
    "number",
    "png_data_uri",
    "render",
]

# Inline style and script only; images from data: URIs only; nothing is fetched.
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


@functools.cache
def environment() -> jinja2.Environment:
    """The pages' template environment (made once): templates from the `fuse` package's
    `templates/` folder (package data, so an installed copy finds them too), autoescaping for
    `.html`, and an error for any name a template uses that was not handed to it."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fuse.pages", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        # block tags on their own line leave no blank line behind
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **values) -> str:
    """The template `template` (a name under `fuse/pages/templates/`, e.g. "triage.html") rendered
    with `values` (plain strings, numbers, lists and dicts; never pre-built HTML) and `csp`.

    Raises:
        jinja2.UndefinedError: the template uses a name not in `values` (a bug, not user input).
    """
    return environment().get_template(template).render(csp=CSP, **values)


def code_segments(text: str) -> list[dict]:
    """Text with `code` spans (between backticks) as [{"text", "code": bool}, ...], for the
    `with_code` macro of `macros.html`: the text stays plain, the template adds <code>."""
    parts = re.split(r"`([^`]+)`", text)
    # re.split with one group alternates: text, code, text, code, ..., text
    return [{"text": part, "code": bool(i % 2)} for i, part in enumerate(parts) if part]


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

    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        image = opened.convert("RGB")
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
