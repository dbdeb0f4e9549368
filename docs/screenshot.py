"""Screenshot of an HTML page for the README: the top of the page, as a small palette PNG.

    python docs/screenshot.py artifacts/runs/demo/report/index.html docs/report.png
    python docs/screenshot.py triage.html docs/triage.png --height 1100

Uses Debian's chromium through the playwright package (the dev extra), as the browser tests do.
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

from PIL import Image

__all__ = ["main", "screenshot"]

_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def screenshot(
    page_path: Path, out: Path, width: int, height: int, scale: float, colors: int
) -> int:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=_FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        png = page.screenshot(full_page=False)
        browser.close()
    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        if scale != 1:
            image = image.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
            )
        image.quantize(
            colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        ).save(out, optimize=True)
    return out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--scale", type=float, default=0.8, help="resize factor of the image")
    parser.add_argument("--colors", type=int, default=128, help="palette size")
    args = parser.parse_args()
    size = screenshot(args.page, args.out, args.width, args.height, args.scale, args.colors)
    print(f"{args.out}: {size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
