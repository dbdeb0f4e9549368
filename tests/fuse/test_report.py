"""The evaluation report: every model and column, valid plots, and the table equal to metrics.json;
index.html with the same table, every plot embedded, and the data set's figures."""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fuse.errors import RunError
from fuse.pages.report import (
    COLUMNS,
    N_RESAMPLES,
    PLOTS,
    age_column,
    read_operating_point,
    skin_type_column,
    write_report,
)
from fuse.stacking.stack import StackConfig, stack

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def stacked_run(tabular_run):
    stack(tabular_run.dir, config=StackConfig(num_boost_round=60))
    pd.DataFrame(
        {"feature": ["age", "size", "sex__male"], "gain": [5.0, 9.0, 1.0], "split": [3, 4, 1]}
    ).to_csv(tabular_run.dir / "gbdt" / "importance.csv", index=False)
    return tabular_run


def _table(markdown: str) -> pd.DataFrame:
    """The first table of a Markdown text (the model table of report.md)."""
    lines = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    rows = [line for line in lines if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    body = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
    return pd.DataFrame(body, columns=header)


def test_table_has_every_model_and_column_and_matches_metrics_json(stacked_run):
    path = write_report(stacked_run.dir)
    assert path == stacked_run.dir / "report" / "report.md"
    table = _table(path.read_text())
    assert list(table.columns) == ["model"] + [heading for _, heading, _ in COLUMNS]
    names = [
        cell.replace("**", "").replace(" (final)", "").split(" (")[0] for cell in table["model"]
    ]
    document = json.loads((stacked_run.dir / "report" / "metrics.json").read_text())
    final = json.loads((stacked_run.dir / "stack" / "final.json").read_text())
    calibrated = "calibration" in final  # runs stacked since calibration have the calibrated row
    assert names == ["gbdt", "fusion", "blend", "stack"] + (["calibrated"] if calibrated else [])
    assert document["final"] == final["final"]
    assert table["model"][names.index(final["final"])] == f"**{final['final']}** (final)"
    for row, name in zip(table.itertuples(index=False), names, strict=True):
        figures = document["models"][name]
        for (key, heading, fmt), cell in zip(COLUMNS, row[1:], strict=True):
            if figures[key] is None:  # Brier and ECE of the rank blend, which is no probability
                assert cell == "n/a" and name == "blend" and key in ("brier", "ece"), (
                    name,
                    heading,
                )
                continue
            assert cell == format(figures[key], fmt), (name, heading)
            if fmt == "d":
                assert int(cell) == figures[key]
            else:
                assert math.isclose(float(cell), figures[key], rel_tol=1e-3, abs_tol=1e-4)
    # the final model's threshold is the one stack chose for the same sensitivity (on the
    # calibrated probability where there is one: the threshold scoring applies)
    chosen = "calibrated" if calibrated else final["final"]
    assert document["models"][chosen]["threshold"] == pytest.approx(final["threshold"])
    assert document["final_threshold"] == pytest.approx(final["threshold"])
    if calibrated:
        method = final["calibration"]["method"]
        assert (
            table["model"][names.index("calibrated")]
            == f"**calibrated** ({final['final']}, {method})"
        )
        assert "on the calibrated probability (row `calibrated`" in path.read_text()


def test_every_plot_is_a_valid_png(stacked_run):
    path = write_report(stacked_run.dir)
    document = json.loads((path.parent / "metrics.json").read_text())
    assert set(document["plots"]) == set(PLOTS)
    text = path.read_text()
    for name in PLOTS.values():
        file = path.parent / name
        assert file.read_bytes()[:8] == PNG_MAGIC
        with Image.open(file) as image:
            image.verify()
        assert f"]({name})" in text


def test_sensitivity_option_changes_thresholds_and_says_so(stacked_run):
    write_report(stacked_run.dir, sensitivity=0.95)
    high = json.loads((stacked_run.dir / "report" / "metrics.json").read_text())
    path = write_report(stacked_run.dir, sensitivity=0.6)
    low = json.loads((path.parent / "metrics.json").read_text())
    assert low["sensitivity"] == 0.6
    for name in ("gbdt", "fusion"):
        assert low["models"][name]["threshold"] >= high["models"][name]["threshold"]
        assert low["models"][name]["recall"] >= 0.6
    assert "Rerun `invoke stack --run R --sensitivity 0.6`" in path.read_text()


def test_report_of_base_models_only(tabular_run):
    path = write_report(tabular_run.dir)
    document = json.loads((path.parent / "metrics.json").read_text())
    assert list(document["models"]) == ["gbdt", "fusion"]
    assert document["final"] is None
    assert "No final model yet: run `invoke stack --run R`" in path.read_text()
    assert "importance" not in document["plots"]  # no gbdt/importance.csv in this run


def test_run_without_models_is_refused(run_factory):
    run = run_factory()
    with pytest.raises(RunError, match=r"no model has out-of-fold predictions yet"):
        write_report(run.dir)


def test_run_not_found(tmp_path):
    with pytest.raises(RunError, match=r"not found \(no run.json\)"):
        write_report(tmp_path / "missing")


def test_bad_sensitivity(tabular_run):
    with pytest.raises(RunError, match=r"sensitivity: expected a value in \(0, 1\], got 0"):
        write_report(tabular_run.dir, sensitivity=0)


# ------------------------------------------------------------------------------ index.html


class _Page(HTMLParser):
    """The parts of index.html the tests look at: table cells by row, images, scripts."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[dict] = []
        self.scripts = 0
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _page(path) -> _Page:
    parser = _Page()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_index_html_has_the_table_final_model_plots_and_data_figures(stacked_run):
    path = write_report(stacked_run.dir)
    index = path.parent / "index.html"
    page = _page(index)
    document = json.loads((path.parent / "metrics.json").read_text())
    final = json.loads((stacked_run.dir / "stack" / "final.json").read_text())

    # the model table: every column of report.md's table, every model, the same cells
    markdown = _table(path.read_text())
    header, *body = page.rows[: 1 + len(document["models"])]
    assert header == list(markdown.columns)
    for row, expected in zip(body, markdown.itertuples(index=False), strict=True):
        name = expected[0].replace("**", "").replace(" (final)", "")
        assert row[0] == (f"{name} final" if name == final["final"] else name)
        assert row[1:] == list(expected[1:])
    assert len(body) == len(document["models"])

    # every plot of report.md, embedded byte for byte
    shown = [image["src"] for image in page.images]
    # ... and the applicability histogram (the stack fitted the run's detector)
    assert len(shown) == len(document["plots"]) + 1 == len(PLOTS) + 1
    histogram = base64.b64encode(
        (path.parent / document["applicability"]["plot"]).read_bytes()
    ).decode()
    assert f"data:image/png;base64,{histogram}" in shown
    for name in document["plots"].values():
        encoded = base64.b64encode((path.parent / name).read_bytes()).decode()
        assert f"data:image/png;base64,{encoded}" in shown
    assert all(src.startswith("data:image/png;base64,") for src in shown)

    text = " ".join(" ".join(page.text).split())
    # the data set's figures and the operating point
    assert f"rows {document['rows']:,}" in text
    assert f"positives (malignant) {document['positives']:,}" in text
    assert document["groups"] == 150 and "groups (lesion_id) 150" in text
    assert document["patients"] is None and "patients" not in text
    assert f"operating threshold {format(document['final_threshold'], '.6g')}" in text
    assert document["final_threshold"] == pytest.approx(final["threshold"])
    assert "target sensitivity 95%" in text
    # self-contained: no address to fetch anything from
    raw = index.read_text()
    assert "http://" not in raw and "https://" not in raw and ' src="data:' in raw
    assert page.scripts == 1  # the table sorter, inline


def test_index_html_escapes_names_from_the_data(stacked_run):
    record_path = stacked_run.dir / "run.json"
    record = json.loads(record_path.read_text())
    record["spec"]["name"] = "<script>alert(1)</script>&co"
    record["spec"]["group"] = 'lesion"<b>'
    record_path.write_text(json.dumps(record))
    path = write_report(stacked_run.dir)
    raw = (path.parent / "index.html").read_text()
    assert "<script>alert(1)" not in raw and "<b>" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;co" in raw
    page = _page(path.parent / "index.html")
    # the quote is escaped too (the engine picks the entity): the text reads back as given
    assert 'groups (lesion"<b>) 150' in " ".join(" ".join(page.text).split())
    assert page.scripts == 1


def test_index_html_without_final_model_says_so(tabular_run):
    path = write_report(tabular_run.dir)
    page = _page(path.parent / "index.html")
    text = " ".join(" ".join(page.text).split())
    assert "No final model yet: run invoke stack --run R" in text
    assert [row[0] for row in page.rows[1:3]] == ["gbdt", "fusion"]
    assert len(page.images) == len(json.loads((path.parent / "metrics.json").read_text())["plots"])


def test_out_of_fold_files_without_targets_are_refused_naming_them(tabular_run):
    for stage in ("gbdt", "fusion"):
        path = tabular_run.dir / stage / "oof.csv"
        oof = pd.read_csv(path)
        oof.loc[3, "target"] = np.nan
        oof.to_csv(path, index=False)
    with pytest.raises(RunError, match=r"empty `target` cell in gbdt/oof.csv, fusion/oof.csv"):
        write_report(tabular_run.dir)


def test_patients_counted_when_the_spec_has_a_patient_column(tmp_path):
    from fuse.pages.report_figures import patients

    folds = pd.DataFrame(
        {"id": ["a", "b", "c", "d"], "group": ["g1", "g1", "g2", "g3"], "fold": [0, 0, 1, 1]}
    )
    pd.DataFrame(
        {"image_id": ["a", "b", "c", "d", "x"], "pid": ["p1", "p1", "p1", "p2", "p9"]}
    ).to_csv(tmp_path / "metadata.csv", index=False)
    spec = {"id": "image_id", "group": "lesion_id", "metadata": str(tmp_path / "metadata.csv")}
    assert patients({"spec": {**spec, "patient": None}}, folds) is None
    assert patients({"spec": {**spec, "patient": "pid"}}, folds) == 2  # x is not in the run
    assert patients({"spec": {**spec, "patient": "lesion_id"}}, folds) == 3  # the group itself
    assert (
        patients(
            {"spec": {**spec, "patient": "pid", "metadata": str(tmp_path / "gone.csv")}}, folds
        )
        is None
    )


# ------------------------------------------------ intervals, subgroups, decision curve


def test_report_states_intervals_subgroups_and_net_benefit(stacked_run):
    path = write_report(stacked_run.dir)
    text = path.read_text()
    page = " ".join(" ".join(_page(path.parent / "index.html").text).split())
    for shown in (text, page):
        for phrase in ("95% CI", "Subgroup", "net benefit", "Clopper-Pearson", "Model card"):
            assert phrase in shown, phrase
    document = json.loads((path.parent / "metrics.json").read_text())
    assert document["intervals"]["n_resamples"] == N_RESAMPLES >= 1000
    assert document["intervals"]["n_groups"] == 150  # resampled by lesion_id, the spec's group
    assert "[model-card.md](model-card.md)" in text


def test_intervals_contain_their_estimates_which_are_the_point_figures(stacked_run):
    path = write_report(stacked_run.dir)
    document = json.loads((path.parent / "metrics.json").read_text())
    intervals = document["intervals"]
    shown = document["shown"]
    assert (
        intervals["final"]
        == shown
        == ("calibrated" if "calibrated" in document["models"] else document["final"])
    )
    assert set(intervals["models"]) == set(document["models"])
    assert set(intervals["differences"]) == set(document["models"]) - {shown}
    point_key = {
        "roc_auc": "roc_auc",
        "pauc80": "pauc80",
        "pr_auc": "pr_auc",
        "brier": "brier",
        "sensitivity": "recall",
        "specificity": "specificity",
    }
    checked = 0
    for name, figures in intervals["models"].items():
        for key, cell in figures.items():
            if cell["estimate"] is None:
                assert name == "blend" and key == "brier"  # a rank has no Brier score
                continue
            assert cell["low"] <= cell["estimate"] <= cell["high"], (name, key, cell)
            assert cell["low"] < cell["high"], (name, key)  # 150 groups: no interval is a point
            assert cell["estimate"] == pytest.approx(
                document["models"][name][point_key[key]], abs=1e-9
            )
            checked += 1
    assert checked == 6 * len(intervals["models"]) - 1
    for name, figures in intervals["differences"].items():
        for key, cell in figures.items():
            if cell["estimate"] is not None:
                assert cell["low"] <= cell["estimate"] <= cell["high"], (name, key, cell)
                expected = (
                    intervals["models"][name][key]["estimate"]
                    - intervals["models"][shown][key]["estimate"]
                )
                assert cell["estimate"] == pytest.approx(expected, abs=1e-12)


def test_operating_point_has_its_exact_lower_bound(stacked_run):
    from tabular.uncertainty import clopper_pearson

    path = write_report(stacked_run.dir)
    document = json.loads((path.parent / "metrics.json").read_text())
    point = document["operating_point"]
    assert point["threshold"] == pytest.approx(document["final_threshold"])
    assert point["tp"] + point["fn"] == document["positives"]
    assert point["sensitivity"] == pytest.approx(document["models"][document["shown"]]["recall"])
    low, high = clopper_pearson(point["tp"], point["tp"] + point["fn"])
    assert point["sensitivity_low"] == pytest.approx(low) and point[
        "sensitivity_high"
    ] == pytest.approx(high)
    assert point["sensitivity_low"] < point["sensitivity"]
    assert f"lower 95% bound {low:.3f}" in path.read_text()
    assert read_operating_point(stacked_run.dir) == point


def test_decision_curve_of_every_probability_from_1_to_50_percent(stacked_run):
    path = write_report(stacked_run.dir)
    document = json.loads((path.parent / "metrics.json").read_text())
    curve = document["decision_curve"]
    assert curve["thresholds"] == pytest.approx([i / 100 for i in range(1, 51)])
    # the rank blend is no probability: no curve of its own
    assert list(curve["net_benefit"]) == [
        "final",
        "gbdt",
        "fusion",
        "stack",
        "treat all",
        "treat none",
    ]
    assert curve["models"]["final"] == document["shown"]
    prevalence = document["positives"] / document["rows"]
    assert curve["prevalence"] == pytest.approx(prevalence)
    assert curve["net_benefit"]["treat all"][0] == pytest.approx(
        prevalence - (1 - prevalence) * 0.01 / 0.99
    )
    assert set(curve["net_benefit"]["treat none"]) == {0.0}
    assert document["plots"]["decision"] == "decision_curve.png"


def _planted_run(run_factory, oof_writer):
    """A run whose gbdt finds every malignant lesion but most of those on the leg."""
    run = run_factory(n_rows=600)
    rng = np.random.default_rng(5)
    y = run.target.astype(bool)
    leg = (run.frame["site"] == "leg").to_numpy()
    p = np.where(y, rng.uniform(0.6, 0.95, len(y)), rng.uniform(0.02, 0.5, len(y)))
    missed = y & leg & (rng.random(len(y)) < 0.6)
    p[missed] = rng.uniform(0.05, 0.3, missed.sum())  # below any threshold that keeps 95% elsewhere
    oof_writer(run, "gbdt", p)
    return run


def test_planted_low_sensitivity_subgroup_is_highlighted(run_factory, oof_writer):
    run = _planted_run(run_factory, oof_writer)
    path = write_report(run.dir, sensitivity=0.8)
    document = json.loads((path.parent / "metrics.json").read_text())
    rows = document["subgroups"]["rows"]
    assert document["subgroups"]["age_column"] == "age"
    assert {r["column"] for r in rows} == {"sex", "site", "age"}
    highlighted = [(r["column"], r["subgroup"]) for r in rows if r["highlight"]]
    assert highlighted == [("site", "leg")]
    leg = next(r for r in rows if r["subgroup"] == "leg")
    assert leg["sensitivity_high"] < 0.8 and leg["status"] == "below target"
    raw = (path.parent / "index.html").read_text()
    rows_html = re.findall(r'<tr( class="[^"]*")?>\s*<td>([^<]+)', raw)
    marked = [label.strip() for cls, label in rows_html if "below-target" in cls]
    assert marked == ["leg"]
    assert "**leg** (below target)" in path.read_text()
    too_few = [r for r in rows if r["positives"] < 10]
    assert too_few and all(r["status"] == "too few to tell" and not r["highlight"] for r in too_few)
    assert "too few to tell" in raw


def test_report_of_a_tabular_only_run_with_lightgbm_final(run_factory, oof_writer):
    """A run with only gbdt/ (no images, no fusion): intervals, subgroups, decision curve, card."""
    run = _planted_run(run_factory, oof_writer)
    path = write_report(run.dir)  # before stack: gbdt is the shown model
    document = json.loads((path.parent / "metrics.json").read_text())
    assert list(document["models"]) == ["gbdt"] and document["shown"] == "gbdt"
    assert (
        list(document["intervals"]["models"]) == ["gbdt"]
        and document["intervals"]["differences"] == {}
    )
    assert "No other model to compare with gbdt." in path.read_text()
    assert 'id="model-differences"' not in (path.parent / "index.html").read_text()
    assert list(document["decision_curve"]["net_benefit"]) == ["final", "treat all", "treat none"]
    # what `invoke stack` makes of a tabular-only run: LightGBM as the final model
    threshold = document["models"]["gbdt"]["threshold"]
    (run.dir / "stack").mkdir()
    (run.dir / "stack" / "final.json").write_text(
        json.dumps({"final": "gbdt", "threshold": threshold, "sensitivity": 0.95})
    )
    path = write_report(run.dir)
    document = json.loads((path.parent / "metrics.json").read_text())
    assert document["final"] == document["shown"] == "gbdt"
    assert document["operating_point"]["threshold"] == pytest.approx(threshold)
    card = (path.parent / "model-card.md").read_text()
    assert "images: none: metadata only" in card
    assert "backbone weights sha256: none: no stage read image embeddings" in card
    assert "95% CI" in path.read_text() and "net benefit" in path.read_text()


def test_unreadable_metadata_leaves_out_subgroups_not_the_report(stacked_run, caplog):
    (stacked_run.dir.parent / "metadata.csv").unlink()
    path = write_report(stacked_run.dir)
    document = json.loads((path.parent / "metrics.json").read_text())
    assert document["subgroups"]["rows"] == []
    assert "metadata.csv could not be tabulated" in document["subgroups"]["unavailable"]
    assert "Subgroup table not made: metadata" in path.read_text()
    assert "subgroups left out" in caplog.text
    assert document["intervals"]["models"]  # the rest is there


@pytest.mark.parametrize(
    ("spec", "age", "skin"),
    [
        ({"numeric": ["age"]}, "age", None),
        ({"numeric": ["size", "age_approx"]}, "age_approx", None),
        ({"numeric": ["age_approx", "Age"], "categorical": ["fitzpatrick"]}, "Age", "fitzpatrick"),
        ({"numeric": ["agent_dose", "stage"], "categorical": ["Skin_Type"]}, None, "Skin_Type"),
        ({}, None, None),
    ],
)
def test_age_and_skin_type_columns_are_picked_by_name(spec, age, skin):
    assert age_column(spec) == age
    assert skin_type_column(spec) == skin


def test_the_report_shows_the_training_novelty_and_the_threshold(stacked_run):
    from fuse.applicability.detector import load

    path = write_report(stacked_run.dir)
    document = json.loads((path.parent / "metrics.json").read_text())
    detector = load(stacked_run.dir / "applicability")
    section = document["applicability"]
    assert section["threshold"] == detector.threshold
    marked = float(np.mean(detector.training_novelty >= detector.threshold))
    assert section["marked_share_out_of_fold"] == pytest.approx(marked) and marked <= 0.025
    assert section["parts"] == ["metadata"]  # a tabular-only run: no image, no acquisition
    text = " ".join(" ".join(_page(path.parent / "index.html").text).split())
    assert "Applicability: when a score does not apply" in text
    assert f"threshold (novelty) {detector.threshold:.4f}" in text
    assert f"training lesions marked, out of fold {marked:.2%}" in text


def test_a_run_without_the_applicability_stage_has_no_such_section(stacked_run):
    import shutil

    shutil.rmtree(stacked_run.dir / "applicability")
    path = write_report(stacked_run.dir)
    assert json.loads((path.parent / "metrics.json").read_text())["applicability"] is None
    page = " ".join((path.parent / "index.html").read_text().split())
    assert "Applicability: when a score does not apply" not in page
    assert "Not measured for this run" in page  # the model card says so instead
