"""The triage page of a scored folder: the lesions to look at first, with their images and reasons.

One self-contained HTML file (thumbnails embedded as base64 JPEG, inline style, no network):
flagged lesions first, then the rest by descending probability; each row with a thumbnail, the
id, the final probability, the base models' scores and the metadata reasons, and a saliency
overlay where one is given. Rows that could not be scored are listed in their own section with
the reason. With a patient column (ISIC 2024 total-body photography: hundreds of lesions per
patient) the page is grouped by patient: patients by their highest probability, each with its
flagged lesions and its top few others, and a count of the rest.

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
from fuse import html

log = logging.getLogger(__name__)

NO_PATIENT = "(no patient id)"
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
) -> Path:
    """Write the triage page of scored lesions to `out` (one self-contained HTML file).

    Args:
        predictions: the scoring output: `id_column` and `probability` (required; NaN where the row
            could not be scored), and where present `p_<stage>` (each base model's score),
            `flagged` (nullable boolean; computed as `probability >= threshold` when absent),
            `reasons` (text such as "age = 71 (+0.80); anatom_site = back (+0.31)") and `error`
            (empty, or why the row could not be scored).
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

    Returns:
        `out` as a Path.

    Raises:
        ValueError: a required column is missing, `patient` has another length than
            `predictions`, or `max_rows` / `per_patient` / `thumbnail_px` is out of range.
    """
    missing = [c for c in (id_column, "probability") if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions: missing column(s) {missing} (columns: {list(predictions.columns)})")
    if max_rows < 1 or per_patient < 0 or thumbnail_px < 8:
        raise ValueError(f"max_rows >= 1, per_patient >= 0 and thumbnail_px >= 8 expected, got "
                         f"{max_rows}, {per_patient}, {thumbnail_px}")
    if patient is not None and len(patient) != len(predictions):
        raise ValueError(f"patient: {len(patient)} values for {len(predictions)} prediction rows")

    rows = _normalise(predictions, id_column, threshold, patient)
    scored = rows[rows["probability"].notna()]
    unscored = rows[rows["probability"].isna()]
    order = np.lexsort((scored["position"].to_numpy(), -scored["probability"].to_numpy(),
                        -scored["flagged"].to_numpy().astype(np.int8)))
    scored = scored.iloc[order]

    render = _Renderer(thumbnail, overlays or {}, thumbnail_px,
                       [c for c in predictions.columns if c.startswith("p_")],
                       has_reasons="reasons" in predictions.columns)
    source = csv_name or "the predictions file"
    counts = {
        "rows": len(rows), "scored": len(scored), "flagged": int(scored["flagged"].sum()),
        "errors": len(unscored), "warnings": int((scored["error"] != "").sum()),
    }
    if patient is None:
        shown = scored.iloc[:max_rows]
        listing = _flat(shown, counts, render, source, max_rows)
    else:
        listing = _grouped(scored, counts, render, source, max_rows, per_patient)
    body = [_header(run_name, threshold, counts, patient is not None, rows, render, prevalence), listing,
            _errors(unscored, source, max_rows, patient is not None)]
    if render.failed:
        log.warning("triage page: %d of the shown images could not be read (shown as placeholders)",
                    render.failed)
    atomic_write_text(out, html.page(f"Triage: {run_name}", "\n".join(body), sortable=True))
    log.info("triage page: %s (%d lesions shown of %d rows)", out, render.shown, len(rows))
    return Path(out)


# --------------------------------------------------------------------------------- the rows


def _normalise(predictions: pd.DataFrame, id_column: str, threshold: float, patient) -> pd.DataFrame:
    """One frame with the columns the page uses, in the input's order."""
    probability = pd.to_numeric(predictions["probability"], errors="coerce").to_numpy(dtype=float)
    if "flagged" in predictions.columns:
        flagged = predictions["flagged"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    else:
        flagged = np.nan_to_num(probability, nan=-np.inf) >= threshold
    flagged &= ~np.isnan(probability)
    frame = pd.DataFrame({
        "id": predictions[id_column].astype(str).to_numpy(),
        "probability": probability,
        "flagged": flagged,
        "reasons": _text(predictions, "reasons"),
        "error": _text(predictions, "error"),
        "position": np.arange(len(predictions)),
    })
    for column in predictions.columns:
        if column.startswith("p_"):
            frame[column] = pd.to_numeric(predictions[column], errors="coerce").to_numpy(dtype=float)
    if patient is not None:
        values = pd.Series(np.asarray(patient, dtype=object))
        frame["patient"] = values.where(values.notna(), NO_PATIENT).astype(str).to_numpy()
    return frame


def _text(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), "", dtype=object)
    return frame[column].fillna("").astype(str).to_numpy(dtype=object)


# --------------------------------------------------------------------------------- sections


def _header(run_name: str, threshold: float, counts: dict, grouped: bool, rows: pd.DataFrame,
            render: _Renderer, prevalence: float | None) -> str:
    e = html.escape
    point = f"{_percent(threshold)} (probability {_decimal(threshold)})"
    facts = [
        ("run", e(run_name)),
        ("operating threshold", e(point)),
        ("rows", f"{counts['rows']:,}"),
        ("scored", f"{counts['scored']:,}"),
        ("flagged", f"<strong>{counts['flagged']:,}</strong>"),
        ("not scored (errors)", f"{counts['errors']:,}" + (' (<a href="#errors">list</a>)'
                                                            if counts["errors"] else "")),
    ]
    if grouped:
        facts.insert(2, ("patients", f"{rows['patient'].nunique():,}"))
    if prevalence is not None:
        facts.insert(2, ("probabilities at prevalence", e(_percent(prevalence))))
    return "\n".join([
        f"<h1>Triage: {e(run_name)}</h1>",
        '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>",
        f"<p>{_explanation(threshold, render, prevalence)}</p>",
    ])


def _explanation(threshold: float, render: _Renderer, prevalence: float | None) -> str:
    e = html.escape
    if prevalence is None:
        where = ("at the prevalence of the data it was trained on (of lesions given 20%, about one "
                 "in five was malignant there); where malignancy is rarer or commoner than there, "
                 "it over- or understates the risk")
    else:
        where = (f"at a prevalence of {e(_percent(prevalence))}, set when scoring (of lesions given "
                 "20%, about one in five would be malignant where that prevalence holds)")
    text = [
        f"<strong>probability</strong> is the model's estimate that the lesion is malignant, {where}.",
        "<strong>flagged</strong> means at or above the run's operating threshold "
        f"({e(_percent(threshold))}), chosen on the training data's out-of-fold predictions for "
        "the run's target sensitivity.",
    ]
    if render.p_columns:
        text.append(f"{', '.join(f'<code>{e(c)}</code>' for c in render.p_columns)}: each base "
                    "model's own score.")
    if render.has_reasons:
        text.append("<strong>reasons</strong>: the metadata values that moved the LightGBM score "
                    "most, with their contribution in log-odds (red raises the score, green "
                    "lowers it).")
    if render.has_overlays:
        text.append("<strong>saliency</strong>: where in the image the fusion model's score "
                    "looked (Grad-CAM), for the lesions that have one.")
    text.append("The model's output is a second opinion, not a diagnosis.")
    return " ".join(text)


def _flat(shown: pd.DataFrame, counts: dict, render: _Renderer, source: str, max_rows: int) -> str:
    flagged = shown[shown["flagged"]]
    others = shown[~shown["flagged"]]
    sentence = _shown_sentence(len(shown), counts, len(flagged), max_rows, source)
    parts = [f'<p class="muted" id="shown">{sentence}</p>']
    if not len(shown):
        parts.append("<p>No row could be scored.</p>")
    parts.append(f"<h2>Flagged ({counts['flagged']:,})</h2>")
    if len(flagged):
        parts.append(render.table(flagged, table_id="flagged-lesions", start=1))
    elif len(shown):
        parts.append("<p>No lesion is at or above the operating threshold.</p>")
    if len(others):
        parts += [f"<h2>Not flagged: the {len(others):,} with the highest probability</h2>",
                  render.table(others, table_id="other-lesions", start=len(flagged) + 1)]
    return "\n".join(parts)


def _shown_sentence(n_shown: int, counts: dict, n_flagged_shown: int, max_rows: int, source: str,
                    which: str = "with the highest probability") -> str:
    e = html.escape
    scored, flagged = counts["scored"], counts["flagged"]
    if n_shown >= scored:
        text = f"Showing all {scored:,} scored row{_s(scored)}, flagged first, then by probability."
    else:
        text = (f"Showing {n_shown:,} of {scored:,} scored rows "
                f"(this page holds at most {max_rows:,} lesions): ")
        if n_flagged_shown < flagged:
            text += (f"the {n_flagged_shown:,} flagged lesion{_s(n_flagged_shown)} {which}, of "
                     f"{flagged:,} flagged. {scored - n_shown:,} more rows, "
                     f"{flagged - n_flagged_shown:,} of them flagged, are not shown.")
        else:
            text += ((f"every flagged lesion ({flagged:,}), then " if flagged else "")
                     + f"the {n_shown - n_flagged_shown:,} unflagged with the highest probability; "
                     f"{scored - n_shown:,} more row{_s(scored - n_shown)} not shown.")
    return e(text) + f" All rows are in <code>{e(source)}</code>."


def _grouped(scored: pd.DataFrame, counts: dict, render: _Renderer, source: str, max_rows: int,
             per_patient: int) -> str:
    """Patients with flagged lesions first, then by highest probability; each with its flagged
    lesions and its top `per_patient` others. Past `max_rows`, flagged lesions (of every patient,
    in patient order) go before the others."""
    e = html.escape
    scored = scored.assign(seq=np.arange(len(scored)))  # page order: flagged, then probability
    by = scored.groupby("patient", sort=False)
    # rank of each row among its patient's unflagged rows
    scored["rank"] = by.cumcount() - by["flagged"].cumsum() + scored["flagged"]
    stats = by.agg(top=("probability", "max"), flagged=("flagged", "sum"), lesions=("id", "size"))
    stats = stats.assign(name=stats.index).sort_values(
        ["flagged", "top", "name"], ascending=[False, False, True], kind="mergesort")
    scored["order"] = scored["patient"].map(pd.Series(np.arange(len(stats)), index=stats.index))
    picked = scored[scored["flagged"] | (scored["rank"] < per_patient)]
    priority = np.lexsort((picked["seq"].to_numpy(), picked["order"].to_numpy(),
                           ~picked["flagged"].to_numpy()))
    chosen = picked.iloc[priority[:max_rows]].sort_values(["order", "seq"])
    hidden = scored[~scored["seq"].isin(chosen["seq"])]
    hidden_by = {name: rows for name, rows in hidden.groupby("patient", sort=False)}

    sections = []
    for name, rows in chosen.groupby("patient", sort=False):
        row = stats.loc[name]
        lesions, flagged = int(row["lesions"]), int(row["flagged"])
        badge = f' <span class="badge flag">{flagged:,} flagged</span>' if flagged else ""
        more = ""
        rest = hidden_by.get(name)
        if rest is not None and len(rest):
            rest_flagged = int(rest["flagged"].sum())
            also = f", {rest_flagged:,} of them flagged" if rest_flagged else ""
            more = (f'<p class="muted more">{len(rest):,} more lesion{_s(len(rest))} of this '
                    f"patient in <code>{e(source)}</code> (highest probability "
                    f"{e(_percent(rest['probability'].max()))}{also}).</p>")
        sections.append(
            f'<section class="patient"><h3>Patient <span class="pid">{e(name)}</span>{badge}</h3>'
            f'<p class="muted">{lesions:,} scored lesion{_s(lesions)}, highest probability '
            f'{e(_percent(row["top"]))}.</p>'
            f"{render.table(rows, table_id=None, start=1)}{more}</section>"
        )
    n_shown, n_flagged_shown = len(chosen), int(chosen["flagged"].sum())
    head = ["<h2>By patient: patients with flagged lesions first, then by highest probability</h2>"]
    sentence = _shown_sentence(n_shown, counts, n_flagged_shown, max_rows, source,
                               which="of the patients listed first")
    if n_shown < counts["scored"]:
        sentence = (f"Each patient shows its flagged lesions and its top {per_patient} "
                    f"other{_s(per_patient)}. " + sentence)
    head.append(f'<p class="muted" id="shown">{sentence} {len(sections):,} of {len(stats):,} '
                f"patient{_s(len(stats))} shown.</p>")
    if not sections:
        head.append("<p>No row could be scored.</p>")
    return "\n".join(head + sections)


def _errors(unscored: pd.DataFrame, source: str, max_rows: int, grouped: bool) -> str:
    if unscored.empty:
        return ""
    e = html.escape
    shown = unscored.iloc[:max_rows]
    head = ('<th class="num">#</th><th>id</th>' + ("<th>patient</th>" if grouped else "")
            + "<th>error</th>")
    rows = []
    for n, row in enumerate(shown.to_dict("records"), start=1):
        reason = row["error"] or "no probability (no error given)"
        patient = f'<td class="id">{e(row["patient"])}</td>' if grouped else ""
        rows.append(f'<tr><td class="num" data-sort="{n}">{n}</td><td class="id">{e(row["id"])}</td>'
                    f"{patient}<td>{e(reason)}</td></tr>")
    note = (f"Showing {len(shown):,} of {len(unscored):,}; all are in <code>{e(source)}</code>."
            if len(shown) < len(unscored) else "")
    return "\n".join([
        f'<h2 id="errors">Not scored ({len(unscored):,})</h2>',
        f"<p>These rows have no probability; the reason is given for each. {note}</p>",
        f'<table class="sortable" id="error-rows"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>",
    ])


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
    return np.format_float_positional(pct, precision=2, unique=False, fractional=False, trim="-") + "%"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


class _Renderer:
    """Table rows of lesions; calls `thumbnail` once per row shown."""

    def __init__(self, thumbnail, overlays: Mapping[str, bytes], px: int, p_columns: list[str],
                 has_reasons: bool):
        self.thumbnail = thumbnail
        self.overlays = overlays
        self.px = px
        self.p_columns = p_columns
        self.has_reasons = has_reasons
        self.has_overlays = bool(overlays)
        self.shown = 0
        self.failed = 0

    def table(self, rows: pd.DataFrame, *, table_id: str | None, start: int) -> str:
        e = html.escape
        image = self.px + 18
        cols = ['<col style="width:48px">', f'<col style="width:{image}px">']
        head = ['<th class="num">#</th>', "<th>image</th>"]
        if self.has_overlays:
            cols.append(f'<col style="width:{image}px">')
            head.append("<th>saliency</th>")
        cols += ['<col style="width:190px">', '<col style="width:104px">', '<col style="width:84px">']
        head += ["<th>id</th>", '<th class="num">probability</th>', "<th>flagged</th>"]
        cols += ['<col style="width:84px">' for _ in self.p_columns]
        head += [f'<th class="num">{e(c)}</th>' for c in self.p_columns]
        if self.has_reasons:
            cols.append("<col>")
            head.append("<th>reasons</th>")
        body = [self._row(row, n) for n, row in enumerate(rows.to_dict("records"), start=start)]
        ident = f' id="{e(table_id)}"' if table_id else ""
        wide = " wide" if self.has_reasons else ""  # the reasons column takes the rest
        return (f'<table class="sortable lesions{wide}"{ident}><colgroup>{"".join(cols)}</colgroup>'
                f'<thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(body)}</tbody></table>')

    def _row(self, row: dict, n: int) -> str:
        e = html.escape
        self.shown += 1
        ident = row["id"]
        cells = [f'<td class="num" data-sort="{n}">{n}</td>', f"<td>{self._image(ident)}</td>"]
        if self.has_overlays:
            overlay = self.overlays.get(ident)
            cells.append(f"<td>{self._picture(overlay, f'saliency of {ident}', 'no overlay')}</td>"
                         if overlay is not None else '<td class="muted">-</td>')
        note = f'<div class="muted">note: {e(row["error"])}</div>' if row["error"] else ""
        cells.append(f'<td class="id">{e(ident)}{note}</td>')
        p = row["probability"]
        cells.append(f'<td class="num" data-sort="{p!r}" title="{e(repr(p))}">'
                     f"<strong>{e(_percent(p))}</strong></td>")
        flagged = row["flagged"]
        cells.append(f'<td data-sort="{int(flagged)}">'
                     + ('<span class="badge flag">flagged</span>' if flagged else "") + "</td>")
        for column in self.p_columns:
            value = row[column]
            key = repr(float(value)) if np.isfinite(value) else ""
            cells.append(f'<td class="num" data-sort="{key}">{e(_decimal(value))}</td>')
        if self.has_reasons:
            cells.append(f"<td>{_reasons(row['reasons'])}</td>")
        css = ' class="flagged"' if flagged else ""
        return f"<tr{css}>{''.join(cells)}</tr>"

    def _image(self, ident: str) -> str:
        data = None
        if self.thumbnail is not None:
            try:
                data = self.thumbnail(ident)
            except Exception as error:  # one unreadable image must not lose the page
                log.debug("thumbnail %s: %s", ident, error)
                self.failed += 1
                return self._placeholder("image unreadable")
        return self._picture(data, f"lesion {ident}", "no image")

    def _picture(self, data: bytes | None, alt: str, missing: str) -> str:
        if data is None:
            return self._placeholder(missing)
        try:
            small = html.image_thumbnail(data, self.px)
        except Exception as error:  # PIL raises several kinds for bytes that are not an image
            log.debug("%s: not a readable image (%s)", alt, error)
            self.failed += 1
            return self._placeholder("image unreadable")
        return (f'<img class="thumb" src="{html.data_uri(small, "image/jpeg")}" '
                f'alt="{html.escape(alt)}">')

    def _placeholder(self, text: str) -> str:
        size = f"width:{self.px}px;height:{self.px * 3 // 4}px"
        return (f'<div class="noimg" style="{size}" role="img" aria-label="{html.escape(text)}">'
                f"{html.escape(text)}</div>")


def _reasons(text: str) -> str:
    """"age = 71 (+0.80); site = back (-0.31)" as a list, raising items red, lowering green."""
    items = [item.strip() for item in text.split(";") if item.strip()]
    if not items:
        return ""
    out = []
    for item in items:
        sign = _REASON.search(item)
        css = {"+": "up", "-": "down"}.get(sign.group(1)) if sign else None
        attr = f' class="{css}"' if css else ""
        out.append(f"<li{attr}>{html.escape(item)}</li>")
    return f'<ul class="reasons">{"".join(out)}</ul>'
