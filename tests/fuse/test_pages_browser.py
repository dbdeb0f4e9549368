"""The run report's index.html and the triage page, opened in a real browser (headless Chromium).

Each page must render (its table with the expected rows), every <img> must have loaded (no
broken-image icon), the console must stay free of errors (the pages' Content-Security-Policy
reports any attempt to fetch something there), and a screenshot is taken.

Needs Debian's `chromium` (CI installs it in .ci/run) and the `playwright` Python package (the
dev extra), which drives that browser: it never downloads a browser of its own here. Skips with
the reason when either is absent, except under CI (CI=true), where that is a failure. Set
LESIONFUSE_SCREENSHOTS=DIR to keep the screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fuse.pages.report import COLUMNS, PLOTS, write_report
from fuse.pages.triage import write_triage_page
from fuse.stacking.stack import StackConfig, stack

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = pytest.mark.slow


def _absent(reason: str):
    if IN_CI:
        pytest.fail(f"{reason}; CI must have it (.ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        _absent("no chromium on PATH (Debian package `chromium`)")
    try:
        from playwright import sync_api
    except ImportError:
        _absent("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as playwright:
        # launch() gives every browser a fresh temporary profile (user data dir)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def open_page(browser, path: Path, screenshot: Path, width: int = 1280) -> tuple[object, list[str]]:
    """Open `path` (file://), wait until loaded, take a full-page screenshot; the page and the
    console errors, page errors and failed requests seen."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    page.screenshot(path=str(screenshot), full_page=True)
    keep = os.environ.get("LESIONFUSE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    return page, problems


def broken_images(page) -> list[str]:
    return page.evaluate(
        "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.alt || i.src.slice(0, 40))"
    )


def assert_screenshot(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width >= 800 and image.height >= 400
        # not a blank page: more than a handful of colours
        assert len(image.convert("RGB").resize((200, 200)).getcolors(40000)) > 50


def test_run_report_renders_in_chromium(browser, tmp_path, tabular_run):
    run = tabular_run  # fake gbdt and fusion out-of-fold predictions (tests/fuse/conftest.py)
    stack(run.dir, config=StackConfig(num_boost_round=60))
    pd.DataFrame({"feature": ["age", "size", "sex__male"], "gain": [5.0, 9.0, 1.0]}).to_csv(
        run.dir / "gbdt" / "importance.csv", index=False
    )
    index = write_report(run.dir).parent / "index.html"
    models = json.loads((index.parent / "metrics.json").read_text())["models"]  # 4, or 5 calibrated

    page, problems = open_page(browser, index, tmp_path / "report.png")
    assert page.title().startswith("Evaluation report: tiny")
    assert page.locator("table#models tbody tr").count() == len(models) >= 4
    assert (
        page.locator("table#models thead th").count() == len(COLUMNS) + 1
    )  # the model name, then each figure
    assert page.locator("img").count() == len(PLOTS) + 1  # and the applicability histogram
    assert page.locator("#plot-applicability img").count() == 1
    facts = page.locator("dl#applicability-facts").inner_text()
    assert "threshold (novelty)" in facts and "training lesions marked, out of fold" in facts
    assert broken_images(page) == []
    sizes = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
    assert min(sizes) > 300  # real plots, not icons
    # the sorting script works: sort by ROC AUC, highest first
    page.locator("table#models thead th", has_text="ROC AUC").click()
    cells = page.locator("table#models tbody tr td:nth-child(3)").all_inner_texts()
    assert [float(c) for c in cells] == sorted((float(c) for c in cells), reverse=True)
    # the intervals, the operating point, the subgroups, the decision curve and the model card
    assert page.locator("table#model-intervals tbody tr").count() == len(models)
    assert "95% CI" in page.locator("table#model-intervals thead").inner_text()
    assert page.locator("table#model-differences tbody tr").count() == len(models) - 1
    assert "Clopper-Pearson" in page.locator("p#operating-point").inner_text()
    assert page.locator("table.subgroups").count() == 3  # sex, site, age bands
    assert page.locator("h3", has_text="Subgroup: site").is_visible()
    assert page.locator("table#net-benefit tbody tr").count() >= 5
    assert page.locator("figure#plot-decision img").is_visible()
    for section in (
        "intended-use",
        "training-data",
        "figures",
        "calibration",
        "subgroups",
        "applicability",
        "limitations",
        "versions",
    ):
        assert page.locator(f"section#card-{section}").is_visible(), section
    # the run was stacked, which fits its applicability detector: the card states its threshold
    assert "novelty threshold" in page.locator("section#card-applicability").inner_text()
    assert problems == []
    assert_screenshot(tmp_path / "report.png")


def test_highlighted_subgroup_renders_in_chromium(browser, tmp_path, run_factory, oof_writer):
    run = run_factory(n_rows=600)
    rng = np.random.default_rng(5)
    y = run.target.astype(bool)
    leg = (run.frame["site"] == "leg").to_numpy()
    p = np.where(y, rng.uniform(0.6, 0.95, len(y)), rng.uniform(0.02, 0.5, len(y)))
    missed = y & leg & (rng.random(len(y)) < 0.6)
    p[missed] = rng.uniform(0.05, 0.3, missed.sum())
    oof_writer(run, "gbdt", p)
    index = write_report(run.dir, sensitivity=0.8).parent / "index.html"
    page, problems = open_page(browser, index, tmp_path / "report-subgroups.png")
    marked = page.locator("table.subgroups tr.below-target")
    assert marked.count() == 1 and marked.locator("td").first.inner_text().startswith("leg")
    assert marked.locator(".badge.flag").is_visible()
    # highlighted: another background than an ordinary row's
    colours = [
        page.evaluate("r => getComputedStyle(r.querySelector('td')).backgroundColor", row)
        for row in (
            marked.element_handle(),
            page.locator("table.subgroups tr:not(.below-target)").nth(1).element_handle(),
        )
    ]
    assert colours[0] != colours[1]
    assert page.locator("table.subgroups td", has_text="too few to tell").count() >= 1
    assert problems == []


def _predictions(ids: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    p = np.sort(rng.beta(0.6, 4, len(ids)))[::-1]
    reasons = [
        "age = 71 (+0.80); localization = back (+0.31)",
        "age = 35 (-0.42); sex = female (-0.10)",
        "",
    ]
    return pd.DataFrame(
        {
            "image_id": ids,
            "probability": p,
            "p_gbdt": np.clip(p + rng.normal(0, 0.05, len(ids)), 0, 1),
            "p_fusion": np.clip(p + rng.normal(0, 0.05, len(ids)), 0, 1),
            "flagged": pd.array(p >= 0.3, dtype="boolean"),
            "reasons": [reasons[i % 3] for i in range(len(ids))],
            "error": "",
        }
    )


@pytest.mark.parametrize("grouped", [False, True], ids=["list", "by-patient"])
def test_triage_page_renders_in_chromium(browser, tmp_path, shared_data, grouped):
    folder = shared_data / "ham10000" / "images"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    files = sorted(folder.glob("*.jpg"))[:12]
    images = {f.stem: f for f in files}
    ids = ["no_image_here"] + list(images)  # the highest probability: shown in both layouts
    frame = _predictions(ids)
    broken = pd.DataFrame(
        {
            "image_id": ["<script>alert(1)</script>", "ISIC_missing"],
            "probability": np.nan,
            "p_gbdt": np.nan,
            "p_fusion": np.nan,
            "flagged": pd.array([None, None], dtype="boolean"),
            "reasons": "",
            "error": ["image unreadable: truncated JPEG", "no image for this id"],
        }
    )
    frame = pd.concat([frame, broken], ignore_index=True)
    frame["in_training"] = frame["image_id"].isin(ids[2:4])  # two rows the run was trained on
    # three scored rows unlike the training lesions, each with its reason; unscored rows empty
    unlike = frame["image_id"].isin(ids[5:8])
    frame["unlike_training"] = pd.array(
        [u if np.isfinite(p) else None for u, p in zip(unlike, frame["probability"], strict=True)],
        dtype="boolean",
    )
    frame["novelty"] = np.where(unlike, 0.999, 0.4)
    frame["novelty_reason"] = np.where(
        unlike, "acquisition (99.9th pct): size 140x140 vs training 600x450", ""
    )
    patient = pd.Series([f"P{i % 3}" for i in range(len(frame))]) if grouped else None
    overlays = {ids[1]: images[ids[1]].read_bytes()}

    def thumbnail(image_id: str) -> bytes | None:
        path = images.get(image_id)
        return path.read_bytes() if path else None

    point = {
        "threshold": 0.3,
        "target_sensitivity": 0.95,
        "tp": 95,
        "fn": 5,
        "sensitivity": 0.95,
        "sensitivity_low": 0.887,
    }
    out = write_triage_page(
        frame,
        tmp_path / "triage.html",
        id_column="image_id",
        thumbnail=thumbnail,
        patient=patient,
        threshold=0.3,
        run_name="ham10000-dev",
        overlays=overlays,
        csv_name="preds.csv",
        per_patient=2,
        operating_point=point,
    )
    name = f"triage-{'by-patient' if grouped else 'list'}.png"
    page, problems = open_page(browser, out, tmp_path / name)
    lesions = page.locator("table.lesions tbody tr")
    if grouped:
        # 13 scored over 3 patients: each shows its flagged lesions and 2 others
        assert page.locator("section.patient").count() == 3
        shown = lesions.count()
        assert 6 <= shown <= 13
        assert page.locator("p.more").count() >= 1
    else:
        assert lesions.count() == 13
        n_flagged = int(frame["flagged"].sum())
        assert page.locator("table#flagged-lesions tbody tr.flagged").count() == n_flagged
        assert page.locator("table#other-lesions tbody tr").count() == 13 - n_flagged
        assert page.locator("table.lesions td .badge.train").count() == 2
    assert page.locator("p#in-training").is_visible()
    assert (
        "lower 95% bound 88.7% (Clopper-Pearson)" in page.locator("dd#operating-point").inner_text()
    )
    banner = page.locator("p#unlike-training")
    assert banner.is_visible()
    assert " ".join(banner.inner_text().split()).startswith(
        "3 of 13 images look unlike the images this run was trained on: their probabilities may "
        "not hold"
    )
    badges = page.locator("table.lesions td .badge.unlike")
    assert badges.count() == (3 if not grouped else badges.count()) and badges.count() >= 1
    assert all("size 140x140 vs training 600x450" in text for text in badges.all_inner_texts())
    assert page.locator("table#error-rows tbody tr").count() == 2
    assert "<script>alert(1)</script>" in page.locator("table#error-rows").inner_text()
    images_shown = page.locator("img.thumb").count()
    assert images_shown >= (6 if grouped else 13)  # 12 thumbnails + 1 overlay
    assert broken_images(page) == []
    assert page.locator(".noimg", has_text="no image").count() == 1  # the id without an image
    assert problems == []
    assert_screenshot(tmp_path / name)
