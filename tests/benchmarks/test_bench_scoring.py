"""The scoring part: scoring a folder end to end beside the embedding pipeline alone, and with
reasons, triage page and saliency overlays beside scoring without them.

One module-scoped run on a synthetic ISIC 2024-layout data set, with a random-initialised
ResNet-50 at 32 px, one LightGBM seed, two fusion epochs and a small stack: about half a minute.
"""

from __future__ import annotations

import pandas as pd
import pytest
from tinyrun import train_tiny_run

from benchmarks.common import machine
from benchmarks.run import format_table
from benchmarks.scoring import bench_scoring, bench_startup
from fuse.errors import RunError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained, stacked run and the random weights it was embedded with."""
    return train_tiny_run(tmp_path_factory.mktemp("score-bench"))


def test_bench_scoring_reports_both_rates(tiny, tmp_path):
    figures = bench_scoring(
        tiny["run"],
        n_images=8,
        weights=tiny["weights"],
        device="cpu",
        num_workers=0,
        workdir=tmp_path,
        startup_images=2,
        startup_repeats=1,
    )
    assert figures["n_images"] == 8 and figures["embedded"] == 8
    assert figures["embed_only_images_per_s"] > 0 and figures["score_images_per_s"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["score_images_per_s"] / figures["embed_only_images_per_s"], rel=1e-2
    )
    assert figures["rows_with_error"] == 0
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 8
    # with reasons, the triage page and overlays, beside the same scoring without them
    assert figures["explained_s"] > 0 and figures["score_s"] > 0
    assert figures["explained_over_plain"] == pytest.approx(
        figures["explained_s"] / figures["score_s"], rel=1e-2
    )
    assert figures["explained_images_per_s"] == pytest.approx(8 / figures["explained_s"], rel=1e-2)
    assert figures["overlays_asked"] == 20
    assert figures["overlays"] == min(20, figures["flagged"]) and figures["flagged"] >= 1
    page = (tmp_path / "triage.html").read_text()
    assert page.count('alt="saliency of ') == figures["overlays"]
    assert "reasons" not in pd.read_csv(tmp_path / "predictions.csv").columns
    assert "reasons" in pd.read_csv(tmp_path / "predictions-explained.csv").columns
    # `invoke score` in a fresh process beside the bare import, as a user runs it
    startup = figures["startup"]
    assert startup["n_images"] == 2 and startup["repeats"] == 1 and startup["page"] is True
    assert startup["score_s"] > 0 and startup["bare_import_s"] > 0
    assert startup["ratio"] == pytest.approx(
        startup["score_s"] / startup["bare_import_s"], rel=1e-2
    )
    assert startup["meets_target"] == (startup["ratio"] <= startup["target_ratio"])
    assert len(pd.read_csv(tmp_path / "startup" / "predictions.csv")) == 2
    assert (tmp_path / "startup" / "predictions.html").is_file()


def test_bench_scoring_without_overlays(tiny, tmp_path):
    figures = bench_scoring(
        tiny["run"],
        n_images=4,
        weights=tiny["weights"],
        device="cpu",
        num_workers=0,
        workdir=tmp_path,
        overlays=0,
        startup_images=0,
    )
    assert figures["overlays_asked"] == 0 and figures["overlays"] == 0
    assert "startup" not in figures
    assert "saliency" not in (tmp_path / "triage.html").read_text().lower()


def test_table_row_of_the_explained_scoring():
    scoring = {
        "n_images": 200,
        "score_images_per_s": 50.0,
        "embed_only_images_per_s": 55.0,
        "ratio": 0.91,
        "score_s": 4.0,
        "explained_s": 5.2,
        "explained_over_plain": 1.3,
        "overlays": 20,
    }
    table = format_table({"machine": machine(), "parts": {"scoring": scoring}})
    label = "score s with reasons + triage page + 20 overlays vs without"
    (line,) = [x for x in table.splitlines() if x.startswith(label)]
    assert line[len(label) :].split() == ["5.2", "4.0", "1.30"]
    assert not [x for x in table.splitlines() if x.startswith("invoke score s of")]
    startup = {
        "n_images": 10,
        "score_s": 6.3,
        "bare_import_s": 4.2,
        "ratio": 1.5,
        "target_ratio": 1.5,
        "bare_import": "import torch, lightgbm, pandas",
    }
    table = format_table(
        {"machine": machine(), "parts": {"scoring": scoring | {"startup": startup}}}
    )
    (line,) = [x for x in table.splitlines() if x.startswith("invoke score s of 10 images vs bare")]
    assert line.split()[-5:] == ["6.3", "4.2", "1.50", "<=", "1.5"]
    older = {
        k: v
        for k, v in scoring.items()
        if k not in ("score_s", "explained_s", "explained_over_plain")
    }
    assert "triage page" not in format_table({"machine": machine(), "parts": {"scoring": older}})


def test_bench_scoring_refuses_bad_counts_and_a_missing_run(tiny, tmp_path):
    with pytest.raises(RunError, match=r"n_images: expected a positive integer, got 0"):
        bench_scoring(tiny["run"], n_images=0)
    with pytest.raises(RunError, match=r"repeats: expected a positive integer, got 0"):
        bench_scoring(tiny["run"], n_images=1, repeats=0)
    with pytest.raises(RunError, match=r"overlays: expected an integer >= 0, got -1"):
        bench_scoring(tiny["run"], n_images=1, overlays=-1)
    with pytest.raises(RunError, match=r"not found \(no run.json\)"):
        bench_scoring(tmp_path / "nowhere", n_images=1)


def test_bench_startup_refuses_bad_counts_and_a_failing_command(tiny, tmp_path):
    with pytest.raises(RunError, match=r"n_images: expected a positive integer, got 0"):
        bench_startup(tiny["run"], n_images=0)
    with pytest.raises(RunError, match=r"repeats: expected a positive integer, got 0"):
        bench_startup(tiny["run"], repeats=0)
    with pytest.raises(RunError, match=r"not found \(no run.json\)"):
        bench_startup(tmp_path / "nowhere")
    # weights other than the run's: `invoke score` exits 2, and the bench says so with its message
    with pytest.raises(RunError, match=r"invoke score .* exited 2: .*error: .*weights"):
        bench_startup(
            tiny["run"], n_images=1, repeats=1, weights=tmp_path / "missing.pth", workdir=tmp_path
        )
