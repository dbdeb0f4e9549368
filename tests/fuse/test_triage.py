"""The triage page: order, grouping by patient, the error section, the cap, escaping, thumbnails."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fuse.pages.triage import NO_PATIENT, write_triage_page


def jpeg(width: int = 200, height: int = 150, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class Page(HTMLParser):
    """Rows of every table (with the table's id and the patient section they are in), images,
    scripts and the visible text."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.images: list[dict] = []
        self.placeholders: list[str] = []
        self.scripts = 0
        self.patients: list[str] = []
        self.text: list[str] = []
        self._table = None
        self._cell = None
        self._in_pid = False
        self._in_head = False
        self._skip = False

    BLOCK = {"p", "div", "td", "th", "tr", "dt", "dd", "li", "h1", "h2", "h3", "table", "section"}

    def _space(self):
        self.text.append(" ")
        if self._cell is not None:
            self._cell.append(" ")

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.BLOCK:
            self._space()
        if tag == "table":
            # "lesions" for the tables of one patient's lesions (no id)
            self._table = attrs.get("id") or (
                "lesions" if "lesions" in attrs.get("class", "") else None
            )
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr" and not self._in_head:
            self.rows.append(
                {
                    "table": self._table,
                    "cells": [],
                    "class": attrs.get("class"),
                    "patient": self.patients[-1] if self.patients else None,
                }
            )
        elif tag == "td" and not self._in_head:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "div" and "noimg" in (attrs.get("class") or ""):
            self.placeholders.append(attrs.get("aria-label"))
        elif tag == "script":
            self.scripts += 1
            self._skip = True
        elif tag == "style":
            self._skip = True
        elif tag == "span" and attrs.get("class") == "pid":
            self._in_pid = True
            self.patients.append("")

    def handle_endtag(self, tag):
        if tag in self.BLOCK:
            self._space()
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "span":
            self._in_pid = False
        elif tag in ("script", "style"):
            self._skip = False

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._in_pid:
            self.patients[-1] += data

    def lesions(self, column: int = 2) -> list[str]:
        """The id column of every lesion row, in page order (the 3rd cell, without overlays)."""
        return [
            r["cells"][column].split(" note:")[0]
            for r in self.rows
            if r["table"] in ("flagged-lesions", "other-lesions", "lesions")
        ]

    def errors(self) -> list[list[str]]:
        return [r["cells"] for r in self.rows if r["table"] == "error-rows"]

    def plain(self) -> str:
        return " ".join("".join(self.text).split())


def read(path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def predictions(p, flagged=None, ids=None, error=None, reasons=None) -> pd.DataFrame:
    p = np.asarray(p, dtype=float)
    n = len(p)
    return pd.DataFrame(
        {
            "image_id": ids if ids is not None else [f"L{i:03d}" for i in range(n)],
            "probability": p,
            "p_gbdt": p,
            "p_fusion": p,
            "flagged": pd.array(
                flagged
                if flagged is not None
                else [None if np.isnan(x) else bool(x >= 0.5) for x in p],
                dtype="boolean",
            ),
            "reasons": reasons if reasons is not None else [""] * n,
            "error": error if error is not None else [""] * n,
        }
    )


def write(frame, tmp_path, **kwargs):
    options = dict(
        id_column="image_id",
        threshold=0.5,
        run_name="r1",
        csv_name="preds.csv",
        thumbnail=lambda image_id: None,
    )
    options.update(kwargs)
    return read(write_triage_page(frame, tmp_path / "triage.html", **options))


def test_flagged_first_then_by_descending_probability(tmp_path):
    # L1 is flagged below an unflagged score (another threshold): flagged still comes first
    frame = predictions([0.2, 0.4, 0.9, 0.6, 0.05], flagged=[False, True, True, False, False])
    page = write(frame, tmp_path)
    assert page.lesions() == ["L002", "L001", "L003", "L000", "L004"]
    flagged_rows = [r for r in page.rows if r["table"] == "flagged-lesions"]
    assert [r["cells"][2] for r in flagged_rows] == ["L002", "L001"]
    assert all(r["class"] == "flagged" for r in flagged_rows)
    text = page.plain()
    assert "Showing all 5 scored rows, flagged first, then by probability." in text
    assert "Flagged (2)" in text
    # probability as a percentage, base scores as decimals, never in scientific notation
    first = flagged_rows[0]["cells"]
    assert first[3] == "90.0%" and first[5] == "0.900"


def test_flagged_column_absent_uses_the_threshold_and_ties_keep_input_order(tmp_path):
    frame = predictions([0.3, 0.7, 0.3, 0.7]).drop(columns=["flagged"])
    page = write(frame, tmp_path, threshold=0.5)
    assert page.lesions() == ["L001", "L003", "L000", "L002"]
    assert len([r for r in page.rows if r["class"] == "flagged"]) == 2


def test_small_probabilities_are_written_without_exponents(tmp_path):
    frame = predictions([4e-6, 0.00052, 0.0123])
    page = write(frame, tmp_path)
    cells = [r["cells"] for r in page.rows if r["table"] == "other-lesions"]
    assert [c[3] for c in cells] == ["1.2%", "0.052%", "0.0004%"]
    assert [c[5] for c in cells] == ["0.012", "0.00052", "0.000004"]


def test_errors_have_their_own_section(tmp_path):
    frame = predictions(
        [0.9, np.nan, 0.1, np.nan],
        error=["", "image unreadable: truncated", "no metadata row: scored on the image", ""],
    )
    page = write(frame, tmp_path)
    assert page.lesions() == ["L000", "L002"]
    assert page.errors() == [
        ["1", "L001", "image unreadable: truncated"],
        ["2", "L003", "no probability (no error given)"],
    ]
    text = page.plain()
    assert "Not scored (2)" in text and "not scored (errors) 2" in text
    # a row scored despite a problem stays in the list, with its note
    other = [r for r in page.rows if r["table"] == "other-lesions"][0]["cells"]
    assert other[2] == "L002 note: no metadata row: scored on the image"


def test_no_error_section_when_every_row_is_scored(tmp_path):
    page = write(predictions([0.9, 0.1]), tmp_path)
    assert page.errors() == [] and "Not scored" not in page.plain()


def test_grouped_by_patient(tmp_path):
    rng = np.random.default_rng(0)
    # A: 2 flagged + 10 others; B: top 0.45, 8 lesions; C: top 0.48, 2 lesions; one row without
    # a patient
    p = np.concatenate(
        [[0.8, 0.6], rng.uniform(0, 0.4, 10), [0.45], rng.uniform(0, 0.3, 7), [0.48, 0.1], [0.47]]
    )
    patient = pd.Series(["A"] * 12 + ["B"] * 8 + ["C"] * 2 + [None])
    frame = predictions(p)
    page = write(frame, tmp_path, patient=patient, per_patient=3)
    assert page.patients == ["A", "C", NO_PATIENT, "B"]
    by_patient = {}
    for row in page.rows:
        if row["table"] == "lesions":
            by_patient.setdefault(row["patient"], []).append(row["cells"][2])
    ids = frame["image_id"].to_numpy()
    order_a = [ids[i] for i in np.argsort(-p[:12], kind="stable")]
    assert by_patient["A"] == order_a[:5]  # 2 flagged + its top 3 others
    assert by_patient["B"] == [ids[i] for i in 12 + np.argsort(-p[12:20], kind="stable")][:3]
    assert by_patient["C"] == ["L020", "L021"]
    assert by_patient[NO_PATIENT] == ["L022"]
    text = page.plain()
    assert "Patient A 2 flagged 12 scored lesions, highest probability 80.0%." in text
    assert "7 more lesions of this patient in preds.csv" in text  # A
    assert "5 more lesions of this patient in preds.csv" in text  # B
    assert "Showing 11 of 23 scored rows" in text
    assert "4 of 4 patients shown." in text
    assert "patients 4" in text


def test_grouped_cap_stops_within_the_list_of_patients(tmp_path):
    p = np.linspace(0.9, 0.01, 60)
    patient = pd.Series([f"P{i % 20:02d}" for i in range(60)])
    page = write(predictions(p), tmp_path, patient=patient, per_patient=2, max_rows=15)
    # past the cap, flagged lesions of every patient go before the others' top rows
    assert len(page.lesions()) == 15
    assert all(r["class"] == "flagged" for r in page.rows)
    assert page.patients == [f"P{i:02d}" for i in range(8)]  # P00..P06 have 2 flagged, P07 one
    assert (
        "Showing 15 of 60 scored rows (this page holds at most 15 lesions): the 15 flagged "
        "lesions of the patients listed first, of 27 flagged. 45 more rows, 12 of them flagged, "
        "are not shown."
    ) in page.plain()
    assert "8 of 20 patients shown." in page.plain()


def test_cap_keeps_flagged_and_top_rows_and_says_where_the_rest_are(tmp_path):
    n = 2000
    p = np.linspace(0.999, 0.0001, n)
    frame = predictions(p, flagged=p >= 0.99)
    n_flagged = int((p >= 0.99).sum())
    calls = []

    def thumbnail(image_id):
        calls.append(image_id)
        return None

    page = write(frame, tmp_path, max_rows=50, thumbnail=thumbnail)
    assert len(page.lesions()) == 50 and len(calls) == 50
    assert page.lesions() == list(frame["image_id"][:50])
    text = page.plain()
    assert (
        f"Showing 50 of 2,000 scored rows (this page holds at most 50 lesions): every flagged "
        f"lesion ({n_flagged}), then the {50 - n_flagged} unflagged with the highest probability; "
        "1,950 more rows not shown. All rows are in preds.csv."
    ) in text


def test_cap_below_the_number_flagged(tmp_path):
    p = np.linspace(0.99, 0.6, 120)
    page = write(predictions(p), tmp_path, max_rows=40)
    assert len(page.lesions()) == 40
    assert all(r["table"] == "flagged-lesions" for r in page.rows if r["table"] != "error-rows")
    assert (
        "Showing 40 of 120 scored rows (this page holds at most 40 lesions): the 40 flagged "
        "lesions with the highest probability, of 120 flagged. 80 more rows, 80 of them "
        "flagged, are not shown. All rows are in preds.csv."
    ) in page.plain()


def test_error_rows_are_capped_too(tmp_path):
    frame = predictions([np.nan] * 30, error=["unreadable"] * 30)
    page = write(frame, tmp_path, max_rows=10)
    assert len(page.errors()) == 10
    assert "Showing 10 of 30; all are in preds.csv." in page.plain()
    assert "No row could be scored." in page.plain()


def test_text_from_the_data_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    frame = predictions(
        [0.9, 0.2, np.nan],
        ids=[evil, 'x" onerror="alert(2)', "<b>e</b>"],
        reasons=["site = <img src=x onerror=alert(3)> (+0.5)", "", ""],
        error=["", "", "<i>bad</i>"],
    )
    patient = pd.Series(["<u>p</u>", "<u>p</u>", "q&r"])
    out = write_triage_page(
        frame,
        tmp_path / "t.html",
        id_column="image_id",
        threshold=0.5,
        run_name="<em>run</em>",
        patient=patient,
        thumbnail=lambda i: None,
        overlays={evil: jpeg()},
    )
    raw = out.read_text()
    for bad in ("<script>alert", "<img src=x", "<b>e", "<i>bad", "<u>p", "<em>run", '" onerror="'):
        assert bad not in raw, bad
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    page = read(out)
    assert page.scripts == 1  # the table sorter only
    assert evil in page.lesions(column=3)  # with the overlay column, the id is the 4th cell
    assert page.patients[0] == "<u>p</u>"
    assert ["1", "<b>e</b>", "q&r", "<i>bad</i>"] in page.errors()
    assert all(image["src"].startswith("data:image/jpeg;base64,") for image in page.images)


def test_thumbnails_downscaled_and_placeholders_never_broken(tmp_path):
    images = {"L000": jpeg(600, 450), "L001": b"not an image"}

    def thumbnail(image_id):
        if image_id == "L003":
            raise OSError("disk gone")
        return images.get(image_id)

    page = write(
        predictions([0.9, 0.8, 0.7, 0.6]),
        tmp_path,
        thumbnail=thumbnail,
        overlays={"L000": jpeg(300, 300, seed=1), "L002": b"junk"},
    )
    assert [i["alt"] for i in page.images] == ["lesion L000", "saliency of L000"]
    sizes = []
    for image in page.images:
        data = base64.b64decode(image["src"].split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as picture:
            assert picture.format == "JPEG"
            sizes.append(picture.size)
    assert sizes == [(96, 72), (96, 96)]
    # unreadable bytes, a failing reader, no image, an unreadable overlay
    assert page.placeholders == [
        "image unreadable",
        "no image",
        "image unreadable",
        "image unreadable",
    ]


def test_header_says_what_probability_and_flagged_mean(tmp_path):
    page = write(
        predictions([0.9, 0.1, np.nan], error=["", "", "x"]),
        tmp_path,
        threshold=0.0123,
        run_name="isic-r1",
    )
    text = page.plain()
    assert "Triage: isic-r1" in text
    assert "operating threshold 1.2% (probability 0.012)" in text
    assert "rows 3 scored 2 flagged 1 not scored (errors) 1" in text
    assert (
        "probability is the model's estimate that the lesion is malignant, at the prevalence of "
        "the data it was trained on" in text
    )
    assert "flagged means at or above the run's operating threshold (1.2%)" in text
    assert "p_gbdt, p_fusion: each base model's own score." in text
    assert "reasons" in text and "saliency" not in text


def test_header_follows_the_columns_and_the_prevalence_given(tmp_path):
    frame = predictions([0.9, 0.1]).drop(columns=["reasons", "p_fusion"])
    page = write(frame, tmp_path, prevalence=0.001, overlays={"L000": jpeg()})
    text = page.plain()
    assert "probabilities at prevalence 0.1%" in text
    assert "at a prevalence of 0.1%, set when scoring" in text
    assert "training data's prevalence" not in text and "trained on (of" not in text
    assert "p_gbdt: each base model's own score." in text
    assert "reasons" not in text
    assert "saliency: where in the image" in text


def test_reasons_are_listed_with_their_direction(tmp_path):
    frame = predictions([0.9], reasons=["age = 71 (+0.80); anatom_site = back (-0.31); size = 3"])
    raw = write_triage_page(
        frame, tmp_path / "t.html", id_column="image_id", threshold=0.5, run_name="r"
    ).read_text()
    assert (
        '<ul class="reasons"><li class="up">age = 71 (+0.80)</li><li class="down">anatom_site '
        "= back (-0.31)</li><li>size = 3</li></ul>"
    ) in raw


def test_bad_arguments(tmp_path):
    frame = predictions([0.5])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['isic_id'\]"):
        write_triage_page(
            frame, tmp_path / "t.html", id_column="isic_id", threshold=0.5, run_name="r"
        )
    with pytest.raises(ValueError, match=r"patient: 2 values for 1 prediction rows"):
        write_triage_page(
            frame,
            tmp_path / "t.html",
            id_column="image_id",
            threshold=0.5,
            run_name="r",
            patient=pd.Series(["a", "b"]),
        )
    with pytest.raises(ValueError, match=r"max_rows >= 1"):
        write_triage_page(
            frame,
            tmp_path / "t.html",
            id_column="image_id",
            threshold=0.5,
            run_name="r",
            max_rows=0,
        )


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True], ids=["list", "by-patient"])
def test_100000_rows_give_a_page_of_500_lesions_and_under_6_mb(tmp_path, grouped):
    n = 100_000
    rng = np.random.default_rng(0)
    p = rng.beta(0.3, 30, n)
    frame = predictions(
        p, flagged=p >= 0.03, reasons=["age = 71 (+0.80); anatom_site = back (+0.31)"] * n
    )
    patient = pd.Series(rng.integers(0, 1000, n).astype(str)) if grouped else None
    image = jpeg(133, 133)
    out = write_triage_page(
        frame,
        tmp_path / "t.html",
        id_column="image_id",
        threshold=0.03,
        run_name="big",
        thumbnail=lambda i: image,
        patient=patient,
        csv_name="preds.csv",
    )
    size = out.stat().st_size
    page = read(out)
    assert len(page.lesions()) == 500
    assert "of 100,000 scored rows (this page holds at most 500 lesions)" in page.plain()
    assert "All rows are in preds.csv." in page.plain()
    assert size < 6_000_000, size


def test_predictions_read_back_from_the_csv_give_the_same_page(tmp_path):
    frame = predictions(
        [0.9, np.nan, 0.2], error=["", "unreadable", ""], reasons=["age = 71 (+0.80)", "", ""]
    )
    frame.to_csv(tmp_path / "preds.csv", index=False)
    again = pd.read_csv(tmp_path / "preds.csv", dtype={"image_id": str}, keep_default_na=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write(frame, tmp_path / "a")
    second = write(again, tmp_path / "b")
    assert first.rows == second.rows
    assert second.lesions() == ["L000", "L002"] and second.errors() == [["1", "L001", "unreadable"]]


def _badges(page: Page) -> list[str]:
    return [r["cells"][2].split(" ")[0] for r in page.rows if "in training data" in r["cells"][2]]


def test_rows_in_the_training_data_carry_a_badge_and_are_counted(tmp_path):
    frame = predictions([0.9, 0.2, 0.6, np.nan], error=["", "", "", "unreadable"])
    frame["in_training"] = [True, False, True, True]
    page = write(frame, tmp_path)
    assert _badges(page) == ["L000", "L002"]  # the unscored L003 is in the error list, no badge
    text = page.plain()
    assert "in training data: score is in-sample" in text
    assert (
        "3 of the 4 rows were in the run's training data (marked in training data): their "
        "scores are in-sample, from models that saw those lesions and their labels"
    ) in text


def test_in_training_read_back_from_a_csv_and_grouped(tmp_path):
    frame = predictions([0.9, 0.2, 0.6])
    frame["in_training"] = [False, True, None]
    frame.to_csv(tmp_path / "preds.csv", index=False)
    again = pd.read_csv(tmp_path / "preds.csv", dtype={"image_id": str})
    assert again["in_training"].dtype == object  # "False", "True", NaN
    page = write(again, tmp_path, patient=pd.Series(["a", "a", "b"]))
    assert _badges(page) == ["L001"]
    assert "1 of the 3 rows was in the run's training data" in page.plain()
    assert "its score is in-sample, from models that saw that lesion and its label" in page.plain()


def test_no_in_training_column_or_none_in_training_changes_nothing(tmp_path):
    frame = predictions([0.9, 0.2])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = tmp_path / "a" / "triage.html"
    write(frame, tmp_path / "a")
    write(frame.assign(in_training=False), tmp_path / "b")
    assert plain.read_text() == (tmp_path / "b" / "triage.html").read_text()
    assert (
        "in training data" not in plain.read_text() and 'id="in-training"' not in plain.read_text()
    )


def test_header_states_the_operating_point_with_its_lower_bound(tmp_path, tabular_run):
    from fuse.pages.report import read_operating_point, write_report
    from fuse.stacking.stack import StackConfig, stack

    assert read_operating_point(tabular_run.dir) is None  # no report yet
    stack(tabular_run.dir, config=StackConfig(num_boost_round=30))
    write_report(tabular_run.dir)
    point = read_operating_point(tabular_run.dir)
    final = json.loads((tabular_run.dir / "stack" / "final.json").read_text())
    assert point["threshold"] == pytest.approx(final["threshold"])
    page = write(
        predictions([0.9, 0.1]), tmp_path, threshold=final["threshold"], operating_point=point
    )
    positives = point["tp"] + point["fn"]
    assert (
        f"sensitivity at this threshold {point['sensitivity']:.1%} out of fold (of {positives} "
        "malignant "
        f"training lesions); lower 95% bound {point['sensitivity_low']:.1%} (Clopper-Pearson); "
        "target 95%"
    ) in page.plain()


def test_operating_point_of_another_threshold_is_not_stated(tmp_path, caplog):
    point = {
        "threshold": 0.3,
        "target_sensitivity": 0.95,
        "tp": 19,
        "fn": 1,
        "sensitivity": 0.95,
        "sensitivity_low": 0.75,
    }
    page = write(predictions([0.9, 0.1]), tmp_path, threshold=0.5, operating_point=point)
    assert "sensitivity at this threshold" not in page.plain()
    assert "operating point is for threshold 0.3, not 0.5" in caplog.text
    page = write(predictions([0.9, 0.1]), tmp_path, threshold=0.3, operating_point=point)
    assert (
        "95.0% out of fold (of 20 malignant training lesions); lower 95% bound 75.0%"
        in page.plain()
    )
