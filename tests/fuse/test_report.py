"""The evaluation report: every model and column, valid plots, and the table equal to metrics.json."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from PIL import Image

from fuse.errors import RunError
from fuse.report import COLUMNS, PLOTS, write_report
from fuse.stack import StackConfig, stack

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def stacked_run(tabular_run):
    stack(tabular_run.dir, config=StackConfig(num_boost_round=60))
    pd.DataFrame({"feature": ["age", "size", "sex__male"], "gain": [5.0, 9.0, 1.0], "split": [3, 4, 1]}).to_csv(
        tabular_run.dir / "gbdt" / "importance.csv", index=False
    )
    return tabular_run


def _table(markdown: str) -> pd.DataFrame:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    body = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
    return pd.DataFrame(body, columns=header)


def test_table_has_every_model_and_column_and_matches_metrics_json(stacked_run):
    path = write_report(stacked_run.dir)
    assert path == stacked_run.dir / "report" / "report.md"
    table = _table(path.read_text())
    assert list(table.columns) == ["model"] + [heading for _, heading, _ in COLUMNS]
    names = [cell.replace("**", "").replace(" (final)", "") for cell in table["model"]]
    assert names == ["gbdt", "fusion", "blend", "stack"]

    document = json.loads((stacked_run.dir / "report" / "metrics.json").read_text())
    final = json.loads((stacked_run.dir / "stack" / "final.json").read_text())
    assert document["final"] == final["final"]
    assert table["model"][names.index(final["final"])] == f"**{final['final']}** (final)"
    for row, name in zip(table.itertuples(index=False), names, strict=True):
        figures = document["models"][name]
        for (key, heading, fmt), cell in zip(COLUMNS, row[1:], strict=True):
            assert cell == format(figures[key], fmt), (name, heading)
            if fmt == "d":
                assert int(cell) == figures[key]
            else:
                assert math.isclose(float(cell), figures[key], rel_tol=1e-3, abs_tol=1e-4)
    # the final model's threshold is the one stack chose for the same sensitivity
    assert document["models"][final["final"]]["threshold"] == pytest.approx(final["threshold"])
    assert document["final_threshold"] == pytest.approx(final["threshold"])


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
