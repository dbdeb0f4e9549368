"""The triage page of a scored folder: the lesions to look at first, with their images and reasons.

One self-contained HTML file (thumbnails embedded as base64 JPEG, inline style, no network):
flagged lesions first, then the rest by descending probability; each row with a thumbnail, the
id, the final probability, the base models' scores and the metadata reasons, and a saliency
overlay where one is given. Rows that could not be scored are listed in their own section with
the reason. With a patient column (ISIC 2024 total-body photography: hundreds of lesions per
patient) the page is grouped by patient: patients by their highest probability, each with its
flagged lesions and its top few others, and a count of the rest. Rows the run was trained on
(`in_training`) carry a badge: their scores are in-sample. Rows unlike the lesions the run was
trained on (`unlike_training`) carry a badge with the reason, and a banner over the lists counts
them: their probabilities may not hold.

The page is the template `fuse/pages/templates/triage.html` (and its parts under `triage/`);
this module turns the predictions into the plain values it shows.

The page stays small at any number of rows: it holds at most `max_rows` lesions (the flagged
ones first, then the top of the list) and says how many more rows the predictions file holds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_write_text
from fuse.pages import html

__all__ = ["IN_TRAINING", "NO_PATIENT", "write_triage_page"]

log = logging.getLogger(__name__)

NO_PATIENT = "(no patient id)"
# The scoring output's column saying the row was in the run's training data (optional).
IN_TRAINING = "in_training"
# The applicability columns of the scoring output (`fuse.scoring.score`): a banner counts the rows
# unlike the training lesions, and each such row carries a badge with its reason.
_UNLIKE = "unlike_training"
_NOVELTY_REASON = "novelty_reason"
_REASON = re.compile(r"\(([+-])")


def write_triage_page(
    predictions: pd.DataFrame,
    out: Path | str,
    *,
    id_column: str,
    threshold: float,
    run_name: str,
    thumbnail: Callable[[str], bytes | None] | None = None,
    patient: pd.Series | np.ndarray | None = None,
    overlays: Mapping[str, bytes] | None = None,
    max_rows: int = 500,
    per_patient: int = 3,
    csv_name: str | None = None,
    thumbnail_px: int = 96,
    prevalence: float | None = None,
    operating_point: Mapping | None = None,
) -> Path:
    """Write the triage page of scored lesions to `out` (one self-contained HTML file).

    Args:
        predictions: the scoring output: `id_column` and `probability` (required; NaN where the row
            could not be scored), and where present `p_<stage>` (each base model's score),
            `flagged` (nullable boolean; computed as `probability >= threshold` when absent),
            `reasons` (text such as "age = 71 (+0.80); anatom_site = back (+0.31)"), `error`
            (empty, or why the row could not be scored) and `in_training` (True where the id was
            in the run's training data: such rows get a badge and the header counts them),
            `unlike_training` with `novelty_reason` (rows unlike the training lesions: a badge
            with the reason each, and a banner counting them among the scored rows).
        out: the HTML file to write (its folder must exist); written atomically.
        id_column: the id column's name (ids are shown as text).
        threshold: the run's operating threshold, shown in the header.
        run_name: the run's name, shown in the title.
        thumbnail: `thumbnail(id)` gives the encoded image bytes (JPEG, PNG, anything PIL reads)
            of a lesion, or None when there is none; called only for the rows shown (at most
            `max_rows`). A missing, failing or unreadable image gives a "no image" placeholder,
            never a broken image. None: placeholders only.
        patient: each row's patient id, row for row with `predictions` (same length; by position).
            Groups the page by patient. None: one list.
        overlays: saliency overlay images (encoded bytes) by id, shown beside the thumbnail of
            those ids.
        max_rows: the most lesions the page lists (and the most error rows it lists).
        per_patient: with `patient`, how many unflagged lesions each patient shows besides its
            flagged ones.
        csv_name: the predictions file's name, for the "all rows are in ..." sentence.
        thumbnail_px: the thumbnails' longest side, in pixels.
        prevalence: the prevalence `probability` was moved to when scoring (a fraction), for the
            header's sentence; None: the probabilities hold at the training data's prevalence.
        operating_point: the run's operating point as its report states it
            (`fuse.pages.report.read_operating_point(run_dir)`: threshold, target_sensitivity,
            sensitivity, sensitivity_low, ...); the header then says the sensitivity reached out
            of fold with its lower 95% bound. Left out (logged) when its threshold is not
            `threshold` (a report written for another operating point). None: not stated.

    Returns:
        `out` as a Path.

    Raises:
        ValueError: a required column is missing, `patient` has another length than
            `predictions`, or `max_rows` / `per_patient` / `thumbnail_px` is out of range.
    """
    _check_arguments(predictions, id_column, patient, max_rows, per_patient, thumbnail_px)
    rows = _normalise(predictions, id_column, threshold, patient)
    scored, unscored = _ordered(rows)
    render = _Renderer(thumbnail, overlays or {}, thumbnail_px)
    counts = _counts(rows, scored, unscored)
    if patient is None:
        listing = _flat(scored.iloc[:max_rows], counts, render, max_rows)
    else:
        listing = _grouped(scored, counts, render, max_rows, per_patient)
    page = html.render(
        "triage.html",
        run_name=run_name,
        threshold={"percent": _percent(threshold), "decimal": _decimal(threshold)},
        prevalence=None if prevalence is None else _percent(prevalence),
        operating=_operating(operating_point, threshold),
        patients=f"{rows['patient'].nunique():,}" if patient is not None else None,
        counts={key: f"{value:,}" for key, value in counts.items()},
        has_errors=bool(counts["errors"]),
        in_training=_in_training(rows),
        unlike=_unlike(scored, "images" if "p_fusion" in predictions.columns else "rows"),
        columns=_columns(predictions, render.has_overlays, thumbnail_px),
        source=csv_name or "the predictions file",
        listing=listing,
        errors=_errors(unscored, max_rows, patient is not None),
    )
    if render.failed:
        log.warning(
            "triage page: %d of the shown images could not be read (shown as placeholders)",
            render.failed,
        )
    atomic_write_text(out, page)
    log.info("triage page: %s (%d lesions shown of %d rows)", out, render.shown, len(rows))
    return Path(out)


def _check_arguments(
    predictions: pd.DataFrame,
    id_column: str,
    patient,
    max_rows: int,
    per_patient: int,
    thumbnail_px: int,
) -> None:
    """Raise ValueError for a missing required column, a `patient` of another length or an
    option out of range."""
    missing = [c for c in (id_column, "probability") if c not in predictions.columns]
    if missing:
        raise ValueError(
            f"predictions: missing column(s) {missing} (columns: {list(predictions.columns)})"
        )
    if max_rows < 1 or per_patient < 0 or thumbnail_px < 8:
        raise ValueError(
            f"max_rows >= 1, per_patient >= 0 and thumbnail_px >= 8 expected, got "
            f"{max_rows}, {per_patient}, {thumbnail_px}"
        )
    if patient is not None and len(patient) != len(predictions):
        raise ValueError(f"patient: {len(patient)} values for {len(predictions)} prediction rows")


def _columns(predictions: pd.DataFrame, overlays: bool, thumbnail_px: int) -> dict:
    """Which columns the lesion tables show: each base model's score, reasons where the
    predictions have them, an overlay column where there are overlays, the image column's width."""
    return {
        "p": [c for c in predictions.columns if c.startswith("p_")],
        "reasons": "reasons" in predictions.columns,
        "overlays": overlays,
        "image_px": thumbnail_px + 18,
    }


def _counts(rows: pd.DataFrame, scored: pd.DataFrame, unscored: pd.DataFrame) -> dict[str, int]:
    """The header's counts: rows, scored, flagged, errors (not scored), warnings (scored with a
    message)."""
    return {
        "rows": len(rows),
        "scored": len(scored),
        "flagged": int(scored["flagged"].sum()),
        "errors": len(unscored),
        "warnings": int((scored["error"] != "").sum()),
    }


def _ordered(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scored rows flagged first, then by descending probability, ties in input order; the
    rows that could not be scored, in input order)."""
    scored = rows[rows["probability"].notna()]
    unscored = rows[rows["probability"].isna()]
    order = np.lexsort(
        (
            scored["position"].to_numpy(),
            -scored["probability"].to_numpy(),
            -scored["flagged"].to_numpy().astype(np.int8),
        )
    )
    return scored.iloc[order], unscored


def _operating(point: Mapping | None, threshold: float) -> dict | None:
    """The header's operating-point values, when `point` belongs to `threshold`."""
    if not point or point.get("sensitivity") is None or point.get("sensitivity_low") is None:
        return None
    if not np.isclose(
        float(point.get("threshold", np.nan)), float(threshold), rtol=1e-9, atol=1e-12
    ):
        log.warning(
            "triage page: the report's operating point is for threshold %s, not %s; its "
            "sensitivity is not stated (rewrite the report: `invoke stack --run R`)",
            point.get("threshold"),
            threshold,
        )
        return None
    target = point.get("target_sensitivity")
    return {
        "sensitivity": f"{point['sensitivity']:.1%}",
        "low": f"{point['sensitivity_low']:.1%}",
        "target": None if target is None else f"{target:.0%}",
        "positives": f"{point['tp'] + point['fn']:,}" if "tp" in point and "fn" in point else None,
    }


# --------------------------------------------------------------------------------- the rows


def _normalise(
    predictions: pd.DataFrame, id_column: str, threshold: float, patient
) -> pd.DataFrame:
    """One frame with the columns the page uses, in the input's order."""
    probability = pd.to_numeric(predictions["probability"], errors="coerce").to_numpy(dtype=float)
    if "flagged" in predictions.columns:
        flagged = predictions["flagged"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    else:
        flagged = np.nan_to_num(probability, nan=-np.inf) >= threshold
    flagged &= ~np.isnan(probability)
    frame = pd.DataFrame(
        {
            "id": predictions[id_column].astype(str).to_numpy(),
            "probability": probability,
            "flagged": flagged,
            "reasons": _text(predictions, "reasons"),
            "error": _text(predictions, "error"),
            "position": np.arange(len(predictions)),
        }
    )
    if IN_TRAINING in predictions.columns:
        frame[IN_TRAINING] = _truth(predictions[IN_TRAINING])
    if _UNLIKE in predictions.columns:
        frame[_UNLIKE] = _truth(predictions[_UNLIKE])
        frame[_NOVELTY_REASON] = _text(predictions, _NOVELTY_REASON)
    for column in predictions.columns:
        if column.startswith("p_"):
            frame[column] = pd.to_numeric(predictions[column], errors="coerce").to_numpy(
                dtype=float
            )
    if patient is not None:
        values = pd.Series(np.asarray(patient, dtype=object))
        frame["patient"] = values.where(values.notna(), NO_PATIENT).astype(str).to_numpy()
    return frame


def _text(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), "", dtype=object)
    values = frame[column]
    # as object first: a column read back from a CSV with every cell empty is float NaN
    return values.astype(object).where(values.notna(), "").astype(str).to_numpy(dtype=object)


def _truth(values: pd.Series) -> np.ndarray:
    """A yes/no column as booleans, whether it holds booleans or, read back from a CSV or
    Parquet file, text ("True", "false", "1"); missing values are False."""
    if pd.api.types.is_bool_dtype(values):
        return values.fillna(False).to_numpy(dtype=bool)
    text = values.astype("string").str.strip().str.lower()
    return text.isin(["true", "1", "1.0", "yes"]).fillna(False).to_numpy(dtype=bool)


def _in_training(rows: pd.DataFrame) -> dict | None:
    """The header's sentence on rows the run was trained on; None when the predictions have no
    `in_training` column or no such row."""
    if IN_TRAINING not in rows.columns:
        return None
    count = int(rows[IN_TRAINING].sum())
    return {"count": f"{count:,}", "one": count == 1} if count else None


def _unlike(scored: pd.DataFrame, what: str) -> dict | None:
    """The banner's values: how many scored rows look unlike the training lesions (None when the
    predictions have no `unlike_training` column or no such row). `what`: "images" or "rows"."""
    if _UNLIKE not in scored.columns:
        return None
    count = int(scored[_UNLIKE].sum())
    if not count:
        return None
    return {"count": f"{count:,}", "of": f"{len(scored):,}", "what": what, "one": count == 1}


# --------------------------------------------------------------------------------- sections


def _flat(shown: pd.DataFrame, counts: dict, render: _Renderer, max_rows: int) -> dict:
    """The values of `triage/flat.html`: flagged lesions, then the others, as two tables."""
    flagged = shown[shown["flagged"]]
    others = shown[~shown["flagged"]]
    return {
        "grouped": False,
        "shown": _shown_sentence(len(shown), counts, len(flagged), max_rows),
        "empty": not len(shown),
        "flagged": render.table(flagged, table_id="flagged-lesions", start=1)
        if len(flagged)
        else None,
        "others": dict(
            render.table(others, table_id="other-lesions", start=len(flagged) + 1),
            count=f"{len(others):,}",
        )
        if len(others)
        else None,
    }


def _shown_sentence(
    n_shown: int,
    counts: dict,
    n_flagged_shown: int,
    max_rows: int,
    which: str = "with the highest probability",
) -> str:
    """What the page shows of the scored rows (plain text; the page adds where the rest are)."""
    scored, flagged = counts["scored"], counts["flagged"]
    if n_shown >= scored:
        return f"Showing all {scored:,} scored row{_s(scored)}, flagged first, then by probability."
    text = (
        f"Showing {n_shown:,} of {scored:,} scored rows "
        f"(this page holds at most {max_rows:,} lesions): "
    )
    if n_flagged_shown < flagged:
        return text + (
            f"the {n_flagged_shown:,} flagged lesion{_s(n_flagged_shown)} {which}, of "
            f"{flagged:,} flagged. {scored - n_shown:,} more rows, "
            f"{flagged - n_flagged_shown:,} of them flagged, are not shown."
        )
    return text + (
        (f"every flagged lesion ({flagged:,}), then " if flagged else "")
        + f"the {n_shown - n_flagged_shown:,} unflagged with the highest probability; "
        f"{scored - n_shown:,} more row{_s(scored - n_shown)} not shown."
    )


def _grouped(
    scored: pd.DataFrame, counts: dict, render: _Renderer, max_rows: int, per_patient: int
) -> dict:
    """The values of `triage/grouped.html`: patients with flagged lesions first, then by highest
    probability; each with its flagged lesions and its top `per_patient` others. Past `max_rows`,
    flagged lesions (of every patient, in patient order) go before the others."""
    scored = scored.assign(seq=np.arange(len(scored)))  # page order: flagged, then probability
    by = scored.groupby("patient", sort=False)
    # rank of each row among its patient's unflagged rows
    scored["rank"] = by.cumcount() - by["flagged"].cumsum() + scored["flagged"]
    stats = by.agg(top=("probability", "max"), flagged=("flagged", "sum"), lesions=("id", "size"))
    stats = stats.assign(name=stats.index).sort_values(
        ["flagged", "top", "name"], ascending=[False, False, True], kind="mergesort"
    )
    scored["order"] = scored["patient"].map(pd.Series(np.arange(len(stats)), index=stats.index))
    picked = scored[scored["flagged"] | (scored["rank"] < per_patient)]
    priority = np.lexsort(
        (picked["seq"].to_numpy(), picked["order"].to_numpy(), ~picked["flagged"].to_numpy())
    )
    chosen = picked.iloc[priority[:max_rows]].sort_values(["order", "seq"])
    hidden = scored[~scored["seq"].isin(chosen["seq"])]
    hidden_by = {name: rows for name, rows in hidden.groupby("patient", sort=False)}

    sections = []
    for name, rows in chosen.groupby("patient", sort=False):
        row = stats.loc[name]
        lesions, flagged = int(row["lesions"]), int(row["flagged"])
        more = None
        rest = hidden_by.get(name)
        if rest is not None and len(rest):
            rest_flagged = int(rest["flagged"].sum())
            more = {
                "count": f"{len(rest):,}",
                "s": _s(len(rest)),
                "top": _percent(rest["probability"].max()),
                "flagged": f"{rest_flagged:,}" if rest_flagged else None,
            }
        sections.append(
            {
                "name": name,
                "flagged": f"{flagged:,}" if flagged else None,
                "lesions": f"{lesions:,}",
                "lesions_s": _s(lesions),
                "top": _percent(row["top"]),
                "table": render.table(rows, table_id=None, start=1),
                "more": more,
            }
        )
    n_shown, n_flagged_shown = len(chosen), int(chosen["flagged"].sum())
    return {
        "grouped": True,
        "per_patient": per_patient if n_shown < counts["scored"] else None,
        "per_patient_s": _s(per_patient),
        "shown": _shown_sentence(
            n_shown, counts, n_flagged_shown, max_rows, which="of the patients listed first"
        ),
        "patients_shown": f"{len(sections):,}",
        "patients": f"{len(stats):,}",
        "patients_s": _s(len(stats)),
        "sections": sections,
    }


def _errors(unscored: pd.DataFrame, max_rows: int, grouped: bool) -> dict | None:
    """The values of `triage/errors.html`, or None when every row was scored."""
    if unscored.empty:
        return None
    shown = unscored.iloc[:max_rows]
    rows = [
        {
            "n": n,
            "id": row["id"],
            "patient": row["patient"] if grouped else None,
            "reason": row["error"] or "no probability (no error given)",
        }
        for n, row in enumerate(shown.to_dict("records"), start=1)
    ]
    return {
        "count": f"{len(unscored):,}",
        "rows": rows,
        "grouped": grouped,
        "shown": f"{len(shown):,}" if len(shown) < len(unscored) else None,
    }


# ------------------------------------------------------------------------------------ cells


def _decimal(value: float) -> str:
    """0.529, 0.042, 0.0037, 0.000004: three decimals, or two significant digits below 0.01;
    never scientific notation."""
    if value is None or not np.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 0.01:
        return f"{value:.3f}"
    return np.format_float_positional(value, precision=2, unique=False, fractional=False, trim="-")


def _percent(value: float) -> str:
    """A probability as a percentage: 52.9%, 1.8%, 0.82%, 0.055%, 0.0004%."""
    if value is None or not np.isfinite(value):
        return "n/a"
    pct = 100.0 * value
    if pct >= 1:
        return f"{pct:.1f}%"
    if pct == 0:
        return "0%"
    return (
        np.format_float_positional(pct, precision=2, unique=False, fractional=False, trim="-") + "%"
    )


def _s(n: int) -> str:
    return "" if n == 1 else "s"


class _Renderer:
    """The values of a table of lesions (`triage/lesions.html`); calls `thumbnail` once per row
    shown and counts the images it could not read."""

    def __init__(self, thumbnail, overlays: Mapping[str, bytes], px: int):
        self.thumbnail = thumbnail
        self.overlays = overlays
        self.px = px
        self.has_overlays = bool(overlays)
        self.shown = 0
        self.failed = 0

    def table(self, rows: pd.DataFrame, *, table_id: str | None, start: int) -> dict:
        """{"id": `table_id`, "rows": one dict per row}; rows numbered from `start`."""
        p_columns = [c for c in rows.columns if c.startswith("p_")]
        return {
            "id": table_id,
            "rows": [
                self._row(row, n, p_columns)
                for n, row in enumerate(rows.to_dict("records"), start=start)
            ],
        }

    def _row(self, row: dict, n: int, p_columns: list[str]) -> dict:
        self.shown += 1
        ident = row["id"]
        overlay = None
        if self.has_overlays and self.overlays.get(ident) is not None:
            overlay = self._picture(self.overlays[ident], f"saliency of {ident}", "no overlay")
        p = row["probability"]
        return {
            "n": n,
            "id": ident,
            "note": row["error"],
            "image": self._image(ident),
            "overlay": overlay,
            "probability": {"sort": repr(p), "text": _percent(p)},
            "flagged": bool(row["flagged"]),
            "scores": [
                {
                    "sort": repr(float(row[c])) if np.isfinite(row[c]) else "",
                    "text": _decimal(row[c]),
                }
                for c in p_columns
            ],
            "reasons": _reasons(row["reasons"]),
            "in_training": bool(row.get(IN_TRAINING, False)),
            "unlike_training": bool(row.get(_UNLIKE, False)),
            "novelty_reason": row.get(_NOVELTY_REASON, ""),
        }

    def _image(self, ident: str) -> dict:
        data = None
        if self.thumbnail is not None:
            try:
                data = self.thumbnail(ident)
            except Exception as error:  # one unreadable image must not lose the page
                log.debug("thumbnail %s: %s", ident, error)
                self.failed += 1
                return self._placeholder("image unreadable")
        return self._picture(data, f"lesion {ident}", "no image")

    def _picture(self, data: bytes | None, alt: str, missing: str) -> dict:
        """{"src": a JPEG data URI, "alt"}, or a placeholder's {"text", "width", "height"}."""
        if data is None:
            return self._placeholder(missing)
        try:
            small = html.image_thumbnail(data, self.px)
        except Exception as error:  # PIL raises several kinds for bytes that are not an image
            log.debug("%s: not a readable image (%s)", alt, error)
            self.failed += 1
            return self._placeholder("image unreadable")
        return {"src": html.data_uri(small, "image/jpeg"), "alt": alt}

    def _placeholder(self, text: str) -> dict:
        return {"src": None, "text": text, "width": self.px, "height": self.px * 3 // 4}


def _reasons(text: str) -> list[dict]:
    """ "age = 71 (+0.80); site = back (-0.31)" as items, each with its direction ("up" raises
    the score, "down" lowers it, None when it does not say)."""
    items = [item.strip() for item in text.split(";") if item.strip()]
    out = []
    for item in items:
        sign = _REASON.search(item)
        out.append(
            {
                "text": item,
                "direction": {"+": "up", "-": "down"}.get(sign.group(1)) if sign else None,
            }
        )
    return out
