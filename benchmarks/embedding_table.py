"""The embedding part's figures as table rows (`embedding_rows`), each beside its baseline and
the target that applies on the measured hardware."""

from __future__ import annotations

from embed.variants import MIN_CENTRED_COSINE

__all__ = ["embedding_rows"]


def embedding_rows(e: dict) -> list[tuple[str, str, str, str, str]]:
    """Table rows (figure, value, baseline, ratio, target) of a `bench_embedding` result, each
    target as it applies on the measured hardware."""
    from benchmarks.embedding import TARGETS  # here: that module imports this one

    targets = e.get("targets", TARGETS)
    rows = [
        (
            "embed pipeline images/s vs naive loop",
            f"{e['pipeline_images_per_s']:.1f}",
            f"{e['naive_images_per_s']:.1f}",
            f"{e['pipeline_over_naive']:.2f}",
            f">= {targets['pipeline_over_naive']}",
        ),
        (
            "embed pipeline images/s vs model-only ceiling",
            f"{e['pipeline_images_per_s']:.1f}",
            f"{e['ceiling_images_per_s']:.1f}",
            f"{e['pipeline_over_ceiling']:.2f}",
            f">= {targets['pipeline_over_ceiling']}",
        ),
    ]
    if "min_cosine_to_naive" in e:
        rows.append(
            (
                f"embed vectors vs naive fp32, min centred cosine ({e['images_checked']} images)",
                f"{e['min_cosine_to_naive']:.4f}",
                "",
                "",
                f">= {targets['min_cosine_to_naive']}",
            )
        )
    variants = e.get("variants", {})
    eager = variants.get("eager")
    nan = float("nan")  # results written before the median was reported
    for name, v in variants.items():
        if name == "eager":
            continue
        best = name == e.get("best_variant") and "best_variant_over_eager" in targets
        rows.append(
            (
                f"embed ceiling images/s, variant {name} ({v['precision']}; setup "
                f"{v['setup_s'] + v['first_call_s']:.0f} s) vs eager",
                f"{v['ceiling_images_per_s']:.1f}",
                f"{eager['ceiling_images_per_s']:.1f}",
                f"{v['over_eager']:.2f}",
                f">= {targets['best_variant_over_eager']} (best faithful)" if best else "",
            )
        )
        rows.append(
            (
                f"embed variant {name} vs fp32, centred cosine min / p1 / median "
                f"({v.get('images_checked', '?')} images)",
                f"{v['centred_cosine_min']:.4f}",
                f"{v['centred_cosine_p1']:.4f} / {v.get('centred_cosine_median', nan):.4f}",
                "",
                f">= {v.get('cosine_bar', MIN_CENTRED_COSINE)}",
            )
        )
    if (
        eager is not None
        and "best_variant_over_eager" in targets
        and e.get("best_variant") == "eager"
    ):
        rows.append(
            (
                "embed best faithful variant ceiling vs eager (none faster)",
                "eager",
                "",
                "1.00",
                f">= {targets['best_variant_over_eager']}",
            )
        )
    if "reader_images_per_s" in e:
        rows.append(
            (
                "embed pipeline images/s vs its reader (decode only)",
                f"{e['pipeline_images_per_s']:.1f}",
                f"{e['reader_images_per_s']:.1f}",
                f"{e['pipeline_over_reader']:.2f}",
                "",
            )
        )
    if "store_write_rows_per_s" in e:
        rows.append(
            (
                f"store write rows/s ({e['store_rows']} rows)",
                f"{e['store_write_rows_per_s']}",
                "",
                "",
                "",
            )
        )
        rows.append(
            (
                f"store mmap read rows/s ({e['store_rows']} rows)",
                f"{e['store_read_rows_per_s']}",
                "",
                "",
                "",
            )
        )
    return rows
