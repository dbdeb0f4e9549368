"""What each stage of a run read: `<stage>/store.json` written, listed and compared in one place.

A stage that reads embeddings records the feature store it read (its identity fields, folder,
uid and row count) and, under "read", a digest of the vectors of the run's rows
(`{"rows", "ids_sha256", "vectors_sha256"}`, made by `fuse.stores.rows_digest`). This module
owns those files: where they are, writing them with the stage's models, reading them back, and
the digest comparison between stages. Comparing the identity fields themselves is the image
side's (`embed.identity.check_identity`, called by `fuse.stores`); this package imports `common`
only, so that every stage may use it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable

from common.files import atomic_write_text, reporting_write_errors
from runfolder.layout import MADE_BY, STORE_RECORD, RunLayout

__all__ = ["different_rows", "record_store", "store_records", "write_unembedded"]

log = logging.getLogger(__name__)


def record_store(run: RunLayout, stage: str, reference: dict | None) -> None:
    """Write `<stage>/store.json` (the store a stage read), or remove it when the stage read none.

    `stage` may be a stage's folder being rewritten (`RunLayout.rewriting`), so that the record
    is swapped in with the models it describes.

    Raises:
        WriteError: the stage's folder cannot be written (names the path).
    """
    path = run.store_record(stage)
    with reporting_write_errors(f"stage '{stage}'", path):
        if reference is None:
            path.unlink(missing_ok=True)
            return
        run.write_json(stage, STORE_RECORD, reference)


def store_records(run: RunLayout) -> dict[str, dict]:
    """{stage: the store record it wrote} for every stage trained on embeddings, by stage name
    (stages being rewritten, `<stage>.new*`, are not stages yet)."""
    return {
        path.parent.name: json.loads(path.read_text())
        for path in sorted(run.dir.glob(f"*/{STORE_RECORD}"))
        if "." not in path.parent.name
    }


def different_rows(run: RunLayout, records: dict[str, dict]) -> str | None:
    """None when every stage that recorded a digest read the same vectors for the same rows; else
    the message that says which two stages differ, how, and the command that retrains the older.

    A stage recorded before digests existed is not compared (logged).
    """
    read = {stage: record["read"] for stage, record in records.items() if "read" in record}
    unchecked = sorted(set(records) - set(read))
    if unchecked and read:
        log.warning(
            "run %s: stage(s) %s record no digest of the vectors they read (made by an older "
            "version): they are not checked against %s",
            run.dir,
            unchecked,
            sorted(read),
        )
    if len(read) < 2:
        return None
    (first_stage, first), *others = read.items()
    for stage, digest in others:
        if digest == first:
            continue
        what = (
            "their rows differ (ids or their order)"
            if digest.get("ids_sha256") != first.get("ids_sha256")
            else f"the vectors of the run's {first.get('rows')} rows differ (an image was embedded "
            "again between them)"
        )
        # The stage trained first read the older vectors: it is the one to retrain.
        older = min((first_stage, stage), key=lambda s: run.store_record(s).stat().st_mtime)
        return (
            f"run {run.dir}: stages '{first_stage}' and '{stage}' were trained on different data "
            f"from the same feature store: {what} (vectors sha256 "
            f"{first.get('vectors_sha256', '?')[:12]} in '{first_stage}', "
            f"{digest.get('vectors_sha256', '?')[:12]} in '{stage}'); retrain the older one, "
            f"'{older}', on the store as it is now: `{MADE_BY.get(older, older)}`"
        )
    return None


def write_unembedded(run: RunLayout, id_column: str, reasons: Iterable[tuple[str, str]]) -> None:
    """Write `<run>/unembedded-ids.csv` (`id_column`, reason), atomically.

    Raises:
        WriteError: the run folder cannot be written (names the path).
    """
    path = run.unembedded_ids
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([id_column, "reason"])
    writer.writerows(reasons)
    with reporting_write_errors("the list of unembedded ids", path):
        run.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text.getvalue())
