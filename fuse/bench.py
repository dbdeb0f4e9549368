"""`invoke bench`: every throughput and memory figure, each beside its in-run baseline.

Parts (each measured by its own module, in this one run, on this machine):
- embedding: naive loop / pipeline / model-only ceiling, store write and memory-mapped read
  (`embed.bench`);
- gbdt: feature building and one 5-fold fit on the synthetic ISIC 2024-sized table, beside plain
  LightGBM on the raw columns (`tabular.bench`), at several row counts to show cost growth;
- fusion: one MLP epoch beside a linear model's pass over the same store (`fuse.fusion_bench`), at
  the same row counts;
- scoring: a folder of images end to end beside the embedding pipeline alone (`fuse.score_bench`).

Writes `artifacts/bench/bench.json` and prints a table.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fuse.paths import artifacts_root

log = logging.getLogger(__name__)

ISIC2024_ROWS = 401_059
ISIC2024_PATIENTS = 1_042
FULL_SIZES = (10_000, 50_000, ISIC2024_ROWS)
QUICK_SIZES = (10_000,)


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def run_bench(quick: bool = False, out: Path | None = None, device: str = "auto") -> dict:
    """Run every part; `quick` uses small sizes (about a minute or two on 2 cores).

    Returns the JSON-ready figures, also written to `out` (default `artifacts/bench/bench.json`).
    """
    from embed.bench import bench_embedding
    from embed.weights import ensure_weights

    out = out or artifacts_root() / "bench" / ("bench-quick.json" if quick else "bench.json")
    sizes = QUICK_SIZES if quick else FULL_SIZES
    result: dict = {"machine": machine(), "quick": quick, "parts": {}}
    started = time.perf_counter()
    weights = ensure_weights()

    log.info("bench: embedding")
    result["parts"]["embedding"] = bench_embedding(
        weights, n_images=64 if quick else 192, device=device, rounds=2,
        store_rows=20_000 if quick else 100_000)

    result["parts"]["gbdt"] = [_gbdt_at(rows) for rows in sizes]
    result["parts"]["fusion"] = [_fusion_at(rows, device) for rows in sizes]

    log.info("bench: scoring")
    result["parts"]["scoring"] = _scoring(n_images=200 if quick else 2000, device=device)
    result["seconds"] = round(time.perf_counter() - started, 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(format_table(result))
    print(f"bench: {out}")
    return result


def _gbdt_at(rows: int) -> dict:
    from fuse.synthetic import make_isic2024_like
    from tabular.bench import bench_gbdt
    from tabular.spec import isic2024_spec
    from tabular.validate import read_metadata

    log.info("bench: gbdt at %d rows", rows)
    with tempfile.TemporaryDirectory(prefix="bench-gbdt-") as tmp:
        patients = max(10, round(ISIC2024_PATIENTS * rows / ISIC2024_ROWS))
        make_isic2024_like(Path(tmp), n_rows=rows, n_patients=patients, prevalence=0.001 if rows >= 50_000 else 0.005,
                           seed=0, write_images=False)
        spec = isic2024_spec(Path(tmp))
        figures = bench_gbdt(read_metadata(spec), spec)
    return figures


def _fusion_at(rows: int, device: str) -> dict:
    from fuse.fusion_bench import bench_fusion_epoch

    log.info("bench: fusion epoch at %d rows", rows)
    return bench_fusion_epoch(n_rows=rows, device="cpu" if device == "auto" and not torch.cuda.is_available() else device)


def _scoring(n_images: int, device: str) -> dict:
    """Scoring needs a trained run with images: the demo run, made first if absent."""
    from fuse.demo import DEMO_RUN, run_demo
    from fuse.paths import run_dir
    from fuse.score_bench import bench_scoring

    run = run_dir(DEMO_RUN)
    if not (run / "stack" / "final.json").exists():
        run_demo()
    return bench_scoring(run, n_images=n_images, device=device)


def format_table(result: dict) -> str:
    """One line per figure: value, its in-run baseline, the ratio and the target."""
    rows = [("figure", "value", "baseline", "ratio", "target")]
    e = result["parts"]["embedding"]
    rows.append(("embed pipeline images/s vs naive loop", f"{e['pipeline_images_per_s']:.1f}",
                 f"{e['naive_images_per_s']:.1f}", f"{e['pipeline_over_naive']:.2f}", ">= 1.8"))
    rows.append(("embed pipeline images/s vs model-only ceiling", f"{e['pipeline_images_per_s']:.1f}",
                 f"{e['ceiling_images_per_s']:.1f}", f"{e['pipeline_over_ceiling']:.2f}", ">= 0.85"))
    if "min_cosine_to_naive" in e:
        rows.append((f"embed vectors vs naive fp32, min centred cosine ({e['images_checked']} images)",
                     f"{e['min_cosine_to_naive']:.4f}", "", "", ">= 0.95"))
    if "reader_images_per_s" in e:
        rows.append(("embed pipeline images/s vs its reader (decode only)", f"{e['pipeline_images_per_s']:.1f}",
                     f"{e['reader_images_per_s']:.1f}", f"{e['pipeline_over_reader']:.2f}", ""))
    if "store_write_rows_per_s" in e:
        rows.append((f"store write rows/s ({e['store_rows']} rows)", f"{e['store_write_rows_per_s']}", "", "", ""))
        rows.append((f"store mmap read rows/s ({e['store_rows']} rows)", f"{e['store_read_rows_per_s']}", "", "", ""))
    for g in result["parts"]["gbdt"]:
        ours, base = g["ours"], g["baseline"]
        rows.append((f"gbdt features s ({g['rows']} rows)", f"{ours['features_seconds']:.1f}", "", "", ""))
        rows.append((f"gbdt 5-fold fit s ({g['rows']} rows) vs raw LightGBM", f"{ours['fit_seconds']:.1f}",
                     f"{base['fit_seconds']:.1f}", f"{g['ratios']['fit_seconds']:.2f}", "< 180 s"))
        rows.append((f"gbdt peak GB ({g['rows']} rows) vs raw LightGBM", f"{ours['peak_rss_bytes'] / 1e9:.2f}",
                     f"{base['peak_rss_bytes'] / 1e9:.2f}", f"{g['ratios']['peak_rss']:.2f}", "< 4 GB"))
    for f in result["parts"]["fusion"]:
        mlp, lin = f["mlp"], f["linear"]
        n = f["store"]["rows"]
        rows.append((f"fusion epoch s ({n} rows) vs linear pass", f"{mlp['seconds']:.1f}", f"{lin['seconds']:.1f}",
                     f"{f['mlp_vs_linear_time']:.2f}", ""))
        rows.append((f"fusion rows/s ({n} rows)", f"{mlp['rows_per_s']:.0f}", f"{lin['rows_per_s']:.0f}", "", ""))
        rows.append((f"fusion peak / store size ({n} rows)", f"{mlp['peak_vs_store']:.2f}", "", "", "< 2"))
    s = result["parts"]["scoring"]
    rows.append((f"score images/s ({s['n_images']} images) vs embedding alone", f"{s['score_images_per_s']:.1f}",
                 f"{s['embed_only_images_per_s']:.1f}", f"{s['ratio']:.2f}", ">= 0.8"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, torch {m['torch']}"]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
