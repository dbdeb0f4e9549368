"""`invoke bench`: its options, the JSON it writes and the printed table (figure, baseline,
ratio)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import machine
from benchmarks.run import PARTS, check_bench_out, format_table, parse_parts, run_bench
from fuse.errors import RunError

REPO = Path(__file__).resolve().parents[2]
INVOKE = Path(sys.executable).parent / "invoke"

RESULT = {
    "machine": machine(),
    "parts": {
        "embedding": {
            "pipeline_images_per_s": 57.6,
            "naive_images_per_s": 18.2,
            "ceiling_images_per_s": 59.8,
            "reader_images_per_s": 1900.0,
            "pipeline_over_naive": 3.165,
            "pipeline_over_ceiling": 0.963,
            "pipeline_over_reader": 0.03,
            "min_cosine_to_naive": 0.9976,
            "images_checked": 65,
            "store_rows": 1000,
            "store_write_rows_per_s": 84000,
            "store_read_rows_per_s": 95000,
        },
        "gbdt": [
            {
                "rows": 10000,
                "seeds": [0, 1, 2],
                "neg_ratio": 50.0,
                "ours": {
                    "features_seconds": 0.1,
                    "fit_seconds": 1.9,
                    "fit_cpu_seconds": 1.8,
                    "peak_rss_bytes": 3.2e8,
                    "pauc80": 0.1234,
                },
                "unsampled": {
                    "fit_seconds": 7.6,
                    "fit_cpu_seconds": 7.2,
                    "peak_rss_bytes": 3.5e8,
                    "pauc80": 0.1204,
                },
                "baseline": {"fit_seconds": 0.6, "peak_rss_bytes": 2.0e8},
                "ratios": {
                    "fit_seconds": 3.17,
                    "peak_rss": 1.6,
                    "fit_vs_unsampled": 0.25,
                    "pauc80_vs_unsampled": 1.025,
                    "pauc80_delta": 0.003,
                },
            }
        ],
        "fusion": [
            {
                "store": {"rows": 10000},
                "mlp": {
                    "seconds": 0.8,
                    "rows_per_s": 12500,
                    "peak_vs_store": 23.0,
                    "growth_vs_store": 1.3,
                },
                "linear": {"seconds": 0.1, "rows_per_s": 100000, "peak_vs_store": 20.0},
                "mlp_vs_linear_time": 8.0,
            }
        ],
        "scoring": {
            "n_images": 200,
            "score_images_per_s": 57.8,
            "embed_only_images_per_s": 58.4,
            "ratio": 0.99,
        },
    },
}


def _cells(table: str, label: str) -> list[str]:
    (line,) = [x for x in table.splitlines() if x.startswith(label)]
    return line[len(label) :].split()


def test_table_prints_each_figure_with_its_baseline_and_ratio():
    table = format_table(RESULT)
    lines = table.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0]
    expected = {
        "embed pipeline images/s vs naive loop": ("57.6", "18.2", "3.17"),
        "embed pipeline images/s vs model-only ceiling": ("57.6", "59.8", "0.96"),
        "embed pipeline images/s vs its reader (decode only)": ("57.6", "1900.0", "0.03"),
        "embed vectors vs naive fp32, min centred cosine (65 images)": ("0.9976", ">=", "0.95"),
        "gbdt 5-fold fit s (10000 rows) vs raw LightGBM": ("1.9", "0.6", "3.17"),
        "gbdt default 5-fold fit s (10000 rows, 3 seeds, 50 neg/pos) vs every negative": (
            "1.9",
            "7.6",
            "0.25",
        ),
        "gbdt default OOF pAUC80 (10000 rows) vs every negative, difference": (
            "0.1234",
            "0.1204",
            "+0.0030",
        ),
        "gbdt default 5-fold fit CPU s (10000 rows) vs every negative": ("1.8", "7.2", "0.25"),
        "fusion epoch s (10000 rows) vs linear pass": ("0.8", "0.1", "8.00"),
        "fusion whole peak / store size (10000 rows)": ("23.00", "20.00"),
        "score images/s (200 images) vs embedding alone": ("57.8", "58.4", "0.99"),
    }
    for label, cells in expected.items():
        assert _cells(table, label)[:3] == list(cells), label


def test_table_shows_each_target():
    table = format_table(RESULT)
    targets = {
        "embed pipeline images/s vs naive loop": ">= 1.8",
        "embed pipeline images/s vs model-only ceiling": ">= 0.85",
        "gbdt peak GB (10000 rows) vs raw LightGBM": "< 4 GB",
        "fusion memory added / store size (10000 rows)": "< 2",
        "score images/s (200 images) vs embedding alone": ">= 0.8",
    }
    for label, target in targets.items():
        assert " ".join(_cells(table, label)).endswith(target), label


def test_gbdt_targets_name_the_hardware_and_the_row_count_they_hold_for():
    """At 401,059 rows: the seconds target holds on the idle 2-core EPYC, the time ratio where
    LightGBM runs one thread, the pAUC80 target (its noise measured there) on any CPU."""
    full = {**RESULT["parts"]["gbdt"][0], "rows": 401059}
    table = format_table({"machine": RESULT["machine"], "parts": {"gbdt": [full]}})
    fit = " ".join(
        _cells(
            table, "gbdt default 5-fold fit s (401059 rows, 3 seeds, 50 neg/pos) vs every negative"
        )
    )
    assert fit.endswith("<= 0.35 (1 LightGBM thread); < 60 s (idle 2-core EPYC)")
    pauc = " ".join(
        _cells(table, "gbdt default OOF pAUC80 (401059 rows) vs every negative, difference")
    )
    assert pauc.endswith(">= -0.0033 (seed noise, any CPU)")
    # Fewer rows: fixed costs weigh more and the noise was not measured there, so no target.
    small = format_table(RESULT)
    assert (
        _cells(small, "gbdt default OOF pAUC80 (10000 rows) vs every negative, difference")[3:]
        == []
    )
    assert (
        _cells(
            small, "gbdt default 5-fold fit s (10000 rows, 3 seeds, 50 neg/pos) vs every negative"
        )[3:]
        == []
    )
    # A result written before the unsampled side existed still prints.
    old = {
        k: v
        for k, v in RESULT["parts"]["gbdt"][0].items()
        if k not in ("unsampled", "seeds", "neg_ratio")
    }
    table = format_table({"machine": RESULT["machine"], "parts": {"gbdt": [old]}})
    assert (
        "every negative" not in table and "gbdt 5-fold fit s (10000 rows) vs raw LightGBM" in table
    )


def test_table_of_some_parts_leaves_the_others_out():
    only = {"machine": RESULT["machine"], "parts": {"embedding": RESULT["parts"]["embedding"]}}
    table = format_table(only)
    assert "embed pipeline images/s vs naive loop" in table
    assert not any(word in table for word in ("gbdt", "fusion", "score"))


def test_parts_are_named_and_kept_in_order():
    assert parse_parts(None) == PARTS
    assert parse_parts("scoring, embedding") == ("embedding", "scoring")
    assert parse_parts(["gbdt"]) == ("gbdt",)
    with pytest.raises(
        RunError,
        match=r"parts: expected a comma-separated subset of embedding, gbdt, tuning, "
        r"fusion, scoring, got 'embed'",
    ):
        parse_parts("embed")
    with pytest.raises(RunError, match=r"parts: .* got ''"):
        parse_parts("")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_images": 0}, r"n_images: expected an integer >= 1, got 0"),
        ({"batch_size": 0}, r"batch_size: expected an integer >= 1, got 0"),
        ({"num_workers": -1}, r"num_workers: expected an integer >= 0, got -1"),
        ({"rounds": 0}, r"rounds: expected an integer >= 1, got 0"),
        ({"store_rows": -1}, r"store_rows: expected an integer >= 0, got -1"),
        (
            {"weights": "w.pth", "random_weights": True},
            r"weights: w.pth was given together with random_weights",
        ),
        ({"parts": "gpu"}, r"parts: expected a comma-separated subset"),
        ({"rows": 10}, r"rows: expected an integer >= 1000, got 10"),
        ({"score_images": 0}, r"score_images: expected an integer >= 1, got 0"),
        (
            {"parts": "scoring", "run": "/nowhere/run"},
            r"run: /nowhere/run has no final model to score; make it "
            r"with `invoke stack --run /nowhere/run`",
        ),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(RunError, match=message):
        run_bench(out=tmp_path / "bench.json", **options)
    assert not (tmp_path / "bench.json").exists()


def test_embedding_part_alone_with_random_weights(tmp_path, capsys):
    """`invoke bench --parts embedding --random-weights ...`: no weights file, one part, its
    JSON."""
    out = tmp_path / "out" / "gpu-bench.json"
    result = run_bench(
        out=out,
        device="cpu",
        parts="embedding",
        random_weights=True,
        n_images=4,
        image_size=32,
        batch_size=4,
        num_workers=0,
        rounds=1,
        store_rows=0,
    )
    assert list(result["parts"]) == ["embedding"]
    embedding = result["parts"]["embedding"]
    assert embedding["weights_source"] == "random init (throughput only)"
    assert (
        embedding["n_images"] == 4
        and embedding["image_size"] == 32
        and embedding["rounds"]["naive"]
    )
    assert "store_rows" not in embedding  # --store-rows 0 skips the store figures
    assert json.loads(out.read_text())["parts"]["embedding"]["n_images"] == 4
    printed = capsys.readouterr().out
    assert "embed pipeline images/s vs model-only ceiling" in printed and f"bench: {out}" in printed


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "victim.csv",
            "id,p\na,0.5\n",
            r"--out .*victim.csv: expected a file ending in .json, got '.csv'",
        ),
        ("notes", None, r"--out .*notes: expected a file ending in .json, got 'no extension'"),
        ("renamed.json", "id,p\na,0.5\n", r"--out .*renamed.json: exists and is not a JSON file"),
    ],
)
def test_out_is_checked_before_any_work_and_never_replaces_other_files(
    tmp_path, name, content, message
):
    out = tmp_path / name
    if content is not None:
        out.write_text(content)
    with pytest.raises(RunError, match=message):
        run_bench(out=out, parts="gbdt")
    assert content is None or out.read_text() == content


def test_out_a_folder_or_an_unwritable_place_is_refused(tmp_path):
    with pytest.raises(
        RunError, match=r"--out .*: is a folder; give a file path such as .*bench.json"
    ):
        check_bench_out(tmp_path)
    earlier = tmp_path / "earlier.json"
    earlier.write_text('{"parts": {}}')
    assert check_bench_out(earlier) == earlier  # an earlier benchmark may be replaced
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(RunError, match=r"--out .*bench.json: cannot write in .*locked"):
            check_bench_out(locked / "sub" / "bench.json")
    finally:
        locked.chmod(0o700)


def test_cli_refuses_a_csv_out_with_exit_2_and_keeps_it(tmp_path):
    victim = tmp_path / "victim.csv"
    victim.write_text("id,p\na,0.5\n")
    done = subprocess.run(
        [str(INVOKE), "bench", "--quick", "--parts", "gbdt", "--out", str(victim)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "error: --out" in done.stderr and "expected a file ending in .json" in done.stderr
    assert "Traceback" not in done.stderr
    assert victim.read_text() == "id,p\na,0.5\n"


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    """A failed write leaves the earlier figures whole and no temporary file behind."""
    import benchmarks.run as bench_run

    out = tmp_path / "bench.json"
    out.write_text('{"old": true}')
    monkeypatch.setattr(bench_run, "_fusion_at", lambda rows, device: {"rows": rows})
    monkeypatch.setattr(bench_run, "format_table", lambda result: "table")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)  # the rename that publishes the new file
    with pytest.raises(
        RunError, match=r"--out .*bench.json: could not be written \(No space left on device\)"
    ):
        run_bench(out=out, parts="fusion", rows=1000)
    assert json.loads(out.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
