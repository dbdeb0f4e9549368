"""`invoke bench`: every throughput and memory figure, each beside its in-run baseline.

Parts (each measured by its own module, in this one run, on this machine):
- embedding: naive loop / pipeline / model-only ceiling / reader, store write and memory-mapped
  read (`benchmarks.embedding`);
- gbdt: feature building and the default ensemble's 5-fold fit (3 seeds, negatives down-sampled)
  on the synthetic ISIC 2024-sized table, beside the same fit on every negative (time and pAUC80)
  and plain LightGBM on the raw columns (`benchmarks.gbdt`), at several row counts to show cost
  growth;
- tuning: an Optuna trial with a short early-stopping patience (`--trial-patience 10`) beside the
  default (the ensembles' 50), on ISIC 2020 where it lies (`benchmarks.tuning`);
- fusion: one MLP epoch beside a linear model's pass over the same store (`benchmarks.fusion`), at
  the same row counts;
- scoring: a folder of images end to end beside the embedding pipeline alone, and scoring with
  the reasons, the triage page and its saliency overlays beside scoring without them
  (`benchmarks.scoring`), on the demo run (made first if absent); and `invoke score` of a few
  images in a fresh process, start-up included, beside the bare import of torch, lightgbm and
  pandas (`benchmarks.scoring.bench_startup`).

Writes `artifacts/bench/bench.json` (`bench-quick.json` with `quick`), or `--out`, atomically, and
prints a table. `--out` is checked before any part runs (`check_bench_out`), so a bad path never
costs the work nor replaces a file that is not an earlier benchmark.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import ISIC2024_PATIENTS, ISIC2024_ROWS, machine
from benchmarks.embedding import QUICK_VARIANTS, embedding_rows
from benchmarks.fusion import TARGET_GROWTH_VS_STORE
from benchmarks.gbdt import (
    TARGET_FIT_SECONDS,
    TARGET_FIT_VS_PLAIN,
    TARGET_FIT_VS_UNSAMPLED,
    TARGET_PAUC80_DELTA,
    TARGET_PEAK_BYTES,
)
from benchmarks.scoring import TARGET_RATIO as SCORE_TARGET_RATIO
from common.files import atomic_write_text
from embed.weights import ensure_weights
from fuse.demo.run import DEMO_RUN, run_demo
from fuse.errors import RunError
from runfolder.layout import RunLayout
from runfolder.paths import artifacts_root, run_dir

__all__ = ["PARTS", "check_bench_out", "format_table", "parse_parts", "run_bench"]

log = logging.getLogger(__name__)

PARTS = ("embedding", "gbdt", "tuning", "fusion", "scoring")
FULL_SIZES = (10_000, 50_000, ISIC2024_ROWS)
QUICK_SIZES = (10_000,)
# Embedding part: images (and store rows) per run, quick / full.
EMBED_IMAGES = {True: 64, False: 192}
STORE_ROWS = {True: 20_000, False: 100_000}
# Tuning part: trials per study, quick / full.
TUNING_TRIALS = {True: 4, False: 10}
# Scoring part: images scored, quick / full.
SCORE_IMAGES = {True: 200, False: 2000}


def parse_parts(parts: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The parts to run, in `PARTS` order: None (all), or names, or one comma-separated string.

    Raises:
        RunError: an unknown name, or none given.
    """
    if parts is None:
        return PARTS
    names = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts)]
    names = [p for p in names if p]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise RunError(
            f"parts: expected a comma-separated subset of {', '.join(PARTS)}, got {parts!r}"
        )
    return tuple(p for p in PARTS if p in names)


def check_bench_out(out: Path | str) -> Path:
    """Refuse a figures path that cannot be written or would replace something that is not an
    earlier benchmark: the rules of `score --out` (`fuse.scoring.predictions.check_out`) for a
    JSON file.

    Returns:
        `out` as a Path (its folder may not exist yet: `run_bench` makes it).

    Raises:
        RunError: `out` is a folder, does not end in .json, is an existing file that does not hold
            JSON (e.g. a CSV renamed), or its folder (or the nearest existing one above it) cannot
            be written.
    """
    out = Path(out)
    if out.is_dir():
        raise RunError(f"--out {out}: is a folder; give a file path such as {out / 'bench.json'}")
    if out.suffix.lower() != ".json":
        raise RunError(
            f"--out {out}: expected a file ending in .json, got {out.suffix or 'no extension'!r}; "
            "the figures are written as JSON"
        )
    if out.exists():
        try:
            json.loads(out.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RunError(
                f"--out {out}: exists and is not a JSON file ({type(error).__name__}); the "
                "benchmark "
                "would replace it. Give another path"
            ) from None
        log.warning("--out %s exists; it will be replaced once the benchmark finishes", out)
    folder = out.resolve().parent
    while not folder.exists():  # the nearest folder that exists is the one mkdir writes into
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(
            f"--out {out}: cannot write in {folder}; give a path in a folder you can write"
        )
    return out


def _check_count(name: str, value, minimum: int) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < minimum
    ):
        raise RunError(f"{name}: expected an integer >= {minimum}, got {value!r}")


# The smallest value of each count `run_bench` takes (rows: the synthetic table needs positives in
# every fold).
_MINIMUMS = {
    "n_images": 1,
    "image_size": 1,
    "batch_size": 1,
    "num_workers": 0,
    "rounds": 1,
    "store_rows": 0,
    "rows": 1000,
    "score_images": 1,
}


def run_bench(
    quick: bool = False,
    out: Path | str | None = None,
    device: str = "auto",
    *,
    parts: str | tuple[str, ...] | None = None,
    weights: Path | str | None = None,
    random_weights: bool = False,
    images: Path | str | None = None,
    n_images: int | None = None,
    image_size: int = 224,
    batch_size: int | None = None,
    num_workers: int | None = None,
    rounds: int = 2,
    store_rows: int | None = None,
    amp: bool = True,
    rows: int | None = None,
    score_images: int | None = None,
    run: Path | str | None = None,
) -> dict:
    """Run the chosen parts; `quick` uses small sizes (about a minute or two on 2 cores).

    Args:
        quick: small sizes (one row count, fewer images).
        out: where the JSON goes (default `artifacts/bench/bench.json`, `bench-quick.json` when
            quick); its folder is created.
        device: "auto", "cpu" or "cuda", for every part.
        parts: which parts to run (names of `PARTS`, or one comma-separated string); None = all.
        weights: the backbone weights file of the embedding part (default: the cached weights).
        random_weights: the embedding part uses a random-initialised ResNet-50 of the same shape
            (the same work per image, no weights file needed: throughput only).
        images: a folder or HDF5 whose first `n_images` images the embedding part reads (default:
            synthetic ISIC-like crops).
        n_images: images of the embedding part (default 192; 64 when quick).
        image_size, rounds, amp: of the embedding part (`benchmarks.embedding.bench_embedding`).
        batch_size, num_workers: of the embedding and scoring parts (None: the pipeline's
            defaults for the device).
        store_rows: rows of the embedding part's store write and read figures, 0 skips them
            (default 100,000; 20,000 when quick).
        rows: one row count for the gbdt and fusion parts instead of `QUICK_SIZES` / `FULL_SIZES`
            (>= 1,000: the synthetic table needs positives in every fold).
        score_images: images of the scoring part (default 2,000; 200 when quick).
        run: the run the scoring part scores (default: the demo run, made first if absent); with
            `weights`, the scoring part uses those weights too (they must be the run's).

    Returns:
        The JSON-ready figures: machine, quick, parts {name: figures}, seconds.

    Raises:
        RunError: an unknown part; a count below its minimum; `weights` together with
            `random_weights`. Each part raises its own side's errors.
    """
    given = locals()  # the arguments, before any other name is bound here
    chosen = parse_parts(parts)
    _check_counts({name: given[name] for name in _MINIMUMS}, weights, random_weights)
    out = check_bench_out(
        out if out else artifacts_root() / "bench" / ("bench-quick.json" if quick else "bench.json")
    )
    embed_weights = _checked_weights(chosen, weights, random_weights, run)
    sizes = (rows,) if rows else QUICK_SIZES if quick else FULL_SIZES
    result: dict = {"machine": machine(), "quick": quick, "parts": {}}
    started = time.perf_counter()

    if "embedding" in chosen:
        log.info("bench: embedding")
        settings = dict(
            image_size=image_size,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            amp=amp,
            rounds=rounds,
        )
        result["parts"]["embedding"] = _embedding(
            embed_weights,
            images=None if images is None else Path(images),
            n_images=n_images or EMBED_IMAGES[quick],
            store_rows=STORE_ROWS[quick] if store_rows is None else store_rows,
            variants=QUICK_VARIANTS if quick else None,
            **settings,
        )
    if "gbdt" in chosen:
        result["parts"]["gbdt"] = [_gbdt_at(rows) for rows in sizes]
    if "tuning" in chosen:
        from benchmarks.tuning import bench_tuning

        log.info("bench: tuning")
        result["parts"]["tuning"] = bench_tuning(
            trials=TUNING_TRIALS[quick], rounds=1 if quick else 2
        )
    if "fusion" in chosen:
        result["parts"]["fusion"] = [_fusion_at(rows, device) for rows in sizes]
    if "scoring" in chosen:
        log.info("bench: scoring")
        n_scored = score_images or SCORE_IMAGES[quick]
        result["parts"]["scoring"] = _scoring(
            n_scored, device, batch_size, num_workers, run=run, weights=weights
        )
    result["seconds"] = round(time.perf_counter() - started, 1)

    _write_figures(out, result)
    print(format_table(result))
    print(f"bench: {out}")
    return result


def _check_counts(counts: dict, weights, random_weights: bool) -> None:
    """RunError for a count below its minimum, or `weights` together with `random_weights`."""
    for name, value in counts.items():
        _check_count(name, value, _MINIMUMS[name])
    if weights is not None and random_weights:
        raise RunError(f"weights: {weights} was given together with random_weights; choose one")


def _checked_weights(chosen: tuple[str, ...], weights, random_weights: bool, run):
    """The embedding part's checked weights (None with `random_weights` or without that part);
    RunError when the scoring part's run has no final model."""
    # Weights are checked first, so that a missing file stops the run before the long parts.
    embed_weights = None
    if "embedding" in chosen and not random_weights:
        embed_weights = ensure_weights(None if weights is None else Path(weights))
    if "scoring" in chosen:
        if run is not None and not RunLayout(run_dir(run)).final.exists():
            raise RunError(
                f"run: {run} has no final model to score; make it with `invoke stack --run {run}`"
            )
        if weights is None:
            # the demo run's (or the given run's, when made with the cached weights)
            ensure_weights()
    return embed_weights


def _write_figures(out: Path, result: dict) -> None:
    """`result` as JSON to `out`, atomically; RunError (after printing the table) when it fails."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=1, default=str) + "\n")
    except OSError as error:
        # The figures are printed below either way: a failed write loses no measurement.
        print(format_table(result))
        raise RunError(
            f"--out {out}: could not be written ({error.strerror or error}); the figures are "
            "printed above"
        ) from None


def _embedding(weights, **settings) -> dict:
    """The embedding part with `weights`, or (None) a random-initialised ResNet-50 of that shape."""
    from benchmarks.embedding import bench_embedding, random_weights

    if weights is not None:
        return bench_embedding(weights, **settings)
    with tempfile.TemporaryDirectory(prefix="lesionfuse-bench-weights-") as tmp:
        return bench_embedding(random_weights(Path(tmp) / "random-resnet50.pth"), **settings)


def _gbdt_at(rows: int) -> dict:
    from benchmarks.gbdt import bench_gbdt
    from fuse.demo.synthetic import make_isic2024_like
    from tabular.spec import isic2024_spec
    from tabular.validate import read_metadata

    log.info("bench: gbdt at %d rows", rows)
    with tempfile.TemporaryDirectory(prefix="bench-gbdt-") as tmp:
        patients = max(10, round(ISIC2024_PATIENTS * rows / ISIC2024_ROWS))
        make_isic2024_like(
            Path(tmp),
            n_rows=rows,
            n_patients=patients,
            prevalence=0.001 if rows >= 50_000 else 0.005,
            seed=0,
            write_images=False,
        )
        spec = isic2024_spec(Path(tmp))
        return bench_gbdt(read_metadata(spec), spec)


def _fusion_at(rows: int, device: str) -> dict:
    import torch

    from benchmarks.fusion import bench_fusion_epoch

    log.info("bench: fusion epoch at %d rows", rows)
    return bench_fusion_epoch(
        n_rows=rows, device="cpu" if device == "auto" and not torch.cuda.is_available() else device
    )


def _scoring(
    n_images: int,
    device: str,
    batch_size: int | None,
    num_workers: int | None,
    run: Path | str | None = None,
    weights: Path | str | None = None,
) -> dict:
    """Scoring needs a trained run with images: `run`, or the demo run, made first if absent."""
    from benchmarks.scoring import bench_scoring

    layout = RunLayout(run_dir(DEMO_RUN if run is None else run))
    if run is None and not layout.final.exists():
        run_demo()
    return bench_scoring(
        layout.dir,
        n_images=n_images,
        weights=weights,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
    )


def _gbdt_rows(g: dict) -> list[tuple[str, str, str, str, str]]:
    """The GBDT part's lines at one row count: the default ensemble against the same fit on every
    negative (fit time, pAUC80) and against plain LightGBM on the same rows (what the features
    cost; memory), each target with the hardware it holds on. Results written before the
    unsampled side existed print without those lines."""
    ours, base, n = g["ours"], g["baseline"], g["rows"]
    full = n == ISIC2024_ROWS
    rows = [(f"gbdt features s ({n} rows)", f"{ours['features_seconds']:.1f}", "", "", "")]
    unsampled = g.get("unsampled")
    if unsampled:
        target = (
            f"<= {TARGET_FIT_VS_UNSAMPLED:g} (1 LightGBM thread); < {TARGET_FIT_SECONDS:.0f} s "
            f"(idle 2-core EPYC)"
            if full
            else ""
        )
        rows.append(
            (
                f"gbdt default 5-fold fit s ({n} rows, {len(g['seeds'])} seeds, {g['neg_ratio']:g} "
                f"neg/pos) vs every negative",
                f"{ours['fit_seconds']:.1f}",
                f"{unsampled['fit_seconds']:.1f}",
                f"{g['ratios']['fit_vs_unsampled']:.2f}",
                target,
            )
        )
        if "fit_cpu_seconds" in ours and "fit_cpu_seconds" in unsampled:
            rows.append(
                (
                    f"gbdt default 5-fold fit CPU s ({n} rows) vs every negative",
                    f"{ours['fit_cpu_seconds']:.1f}",
                    f"{unsampled['fit_cpu_seconds']:.1f}",
                    f"{ours['fit_cpu_seconds'] / unsampled['fit_cpu_seconds']:.2f}",
                    "",
                )
            )
        delta = g["ratios"].get("pauc80_delta")
        rows.append(
            (
                f"gbdt default OOF pAUC80 ({n} rows) vs every negative, difference",
                _fmt(ours.get("pauc80"), 4),
                _fmt(unsampled.get("pauc80"), 4),
                "n/a" if delta is None else f"{delta:+.4f}",
                f">= {TARGET_PAUC80_DELTA:+g} (seed noise, any CPU)" if full else "",
            )
        )
    plain = g.get("plain")
    if plain and g["ratios"].get("fit_vs_plain") is not None:
        threads = plain.get("lightgbm_threads")
        rows.append(
            (
                f"gbdt default fit s ({n} rows) vs one plain LightGBM 5-fold fit on every row "
                f"({plain.get('rounds', '')} rounds, {threads} LightGBM thread(s) a model both)",
                f"{ours['fit_seconds']:.1f}",
                f"{plain['fit_seconds']:.1f}",
                f"{g['ratios']['fit_vs_plain']:.2f}",
                f"<= {TARGET_FIT_VS_PLAIN:g} (any CPU)" if full else "",
            )
        )
        if g["ratios"].get("fit_cpu_vs_plain") is not None:
            rows.append(
                (
                    f"gbdt default fit CPU s ({n} rows) vs the plain fit",
                    f"{ours['fit_cpu_seconds']:.1f}",
                    f"{plain['fit_cpu_seconds']:.1f}",
                    f"{g['ratios']['fit_cpu_vs_plain']:.2f}",
                    "",
                )
            )
    rows.append(
        (
            f"gbdt 5-fold fit s ({n} rows) vs raw LightGBM",
            f"{ours['fit_seconds']:.1f}",
            f"{base['fit_seconds']:.1f}",
            f"{g['ratios']['fit_seconds']:.2f}",
            "",
        )
    )
    rows.append(
        (
            f"gbdt peak GB ({n} rows) vs raw LightGBM",
            f"{ours['peak_rss_bytes'] / 1e9:.2f}",
            f"{base['peak_rss_bytes'] / 1e9:.2f}",
            f"{g['ratios']['peak_rss']:.2f}",
            f"< {TARGET_PEAK_BYTES / 1024**3:.0f} GB",
        )
    )
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """One line per figure: value, its in-run baseline, the ratio and the target (parts absent
    from `result` are left out)."""
    rows = [("figure", "value", "baseline", "ratio", "target")]
    parts = result["parts"]
    e = parts.get("embedding")
    if e:
        rows.extend(embedding_rows(e))
    for g in parts.get("gbdt", ()):
        rows.extend(_gbdt_rows(g))
    if parts.get("tuning"):
        from benchmarks.tuning import tuning_rows

        rows.extend(tuning_rows(parts["tuning"]))
    for f in parts.get("fusion", ()):
        mlp, lin = f["mlp"], f["linear"]
        n = f["store"]["rows"]
        rows.append(
            (
                f"fusion epoch s ({n} rows) vs linear pass",
                f"{mlp['seconds']:.1f}",
                f"{lin['seconds']:.1f}",
                f"{f['mlp_vs_linear_time']:.2f}",
                "",
            )
        )
        rows.append(
            (
                f"fusion rows/s ({n} rows)",
                f"{mlp['rows_per_s']:.0f}",
                f"{lin['rows_per_s']:.0f}",
                "",
                "",
            )
        )
        rows.append(
            (
                f"fusion memory added / store size ({n} rows)",
                f"{mlp['growth_vs_store']:.2f}",
                "",
                "",
                f"< {TARGET_GROWTH_VS_STORE:g}",
            )
        )
        rows.append(
            (
                f"fusion whole peak / store size ({n} rows)",
                f"{mlp['peak_vs_store']:.2f}",
                f"{lin['peak_vs_store']:.2f}",
                "",
                "",
            )
        )
    s = parts.get("scoring")
    if s:
        rows.append(
            (
                f"score images/s ({s['n_images']} images) vs embedding alone",
                f"{s['score_images_per_s']:.1f}",
                f"{s['embed_only_images_per_s']:.1f}",
                f"{s['ratio']:.2f}",
                f">= {SCORE_TARGET_RATIO}",
            )
        )
        if "explained_s" in s:
            rows.append(
                (
                    f"score s with reasons + triage page + {s['overlays']} overlays vs without",
                    f"{s['explained_s']:.1f}",
                    f"{s['score_s']:.1f}",
                    f"{s['explained_over_plain']:.2f}",
                    "",
                )
            )
        if "startup" in s:
            u = s["startup"]
            rows.append(
                (
                    f"invoke score s of {u['n_images']} images vs bare `{u['bare_import']}` "
                    "(fresh processes)",
                    f"{u['score_s']:.1f}",
                    f"{u['bare_import_s']:.1f}",
                    f"{u['ratio']:.2f}",
                    f"<= {u['target_ratio']}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, torch {m['torch']}"
    ]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
