"""Acquisition cues kept beside a feature store, so that they are measured once per image.

Measuring cues decodes every image again (about 200 images/s on one CPU core): 8,034 HAM10000
images cost about 40 s, 401,059 ISIC 2024 crops over half an hour. `invoke stack` needs them for
every training image and scoring with `--store` for every scored one, so they are cached in the
store folder (`acquisition-cues.npz`), keyed by id and by the image fingerprint the store
recorded when it embedded that id. A rerun measures only ids that are new, whose image changed
(another fingerprint) or that could not be read last time; every run and every rescoring that
reads the store reuses the rest.

Why beside the store and not inside `invoke embed`: the cues and the vectors come from the same
images, and the store already knows each image's fingerprint, so the cache is checked against
the same thing the vectors are; but a store that exists already (or one embedded on a GPU
machine, where decoding is the bottleneck) would otherwise need a second embed pass. Computing
them lazily at the first `invoke stack` keeps `invoke embed` as it is and works on old stores.

The file is numpy arrays only (read with `allow_pickle=False`): ids, fingerprints, the cue
values (rows, len(CUE_NAMES)) and the cue version; it is written atomically (a temporary file,
then renamed). Two processes filling it at once each write a whole file; the ids only the loser
measured are measured again next time. A store folder that cannot be written (read-only media)
is used without a cache, with a warning.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_write
from embed.acquisition import CUE_NAMES, CUES_VERSION, CueTable, acquisition_cues
from embed.errors import EmbedError
from embed.sources import ImageSource

__all__ = ["CUE_CACHE", "cached_cues"]

log = logging.getLogger(__name__)

CUE_CACHE = "acquisition-cues.npz"


def _read_cache(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{id: (fingerprint, cues)} from the cache file; {} when absent, unreadable or of another
    cue version (then every id is measured again)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            version = str(data["version"])
            ids, fingerprints, values = data["ids"], data["fingerprints"], data["values"]
    except (OSError, ValueError, KeyError) as error:
        log.warning(
            "acquisition cue cache %s is unreadable (%s): measuring the cues again", path, error
        )
        return {}
    if version != CUES_VERSION or values.shape != (len(ids), len(CUE_NAMES)):
        log.info(
            "acquisition cue cache %s holds cues of version %s (now %s): measuring again",
            path,
            version,
            CUES_VERSION,
        )
        return {}
    return {str(i): (str(f), v) for i, f, v in zip(ids, fingerprints, values, strict=True)}


def _write_cache(path: Path, entries: dict[str, tuple[str, np.ndarray]]) -> None:
    ids = np.array(list(entries), dtype=str)
    fingerprints = np.array([f for f, _ in entries.values()], dtype=str)
    values = (
        np.stack([v for _, v in entries.values()]) if entries else np.empty((0, len(CUE_NAMES)))
    )

    def write(f) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            version=np.array(CUES_VERSION),
            ids=ids,
            fingerprints=fingerprints,
            values=values.astype(np.float64),
        )
        f.write(buffer.getvalue())

    try:
        atomic_write(path, write)
    except OSError as error:
        log.warning(
            "acquisition cues: cannot write the cache %s (%s); they will be measured again "
            "next time",
            path,
            error,
        )


def cached_cues(
    store_dir: Path | str,
    source: ImageSource | None,
    ids: Sequence[str],
    fingerprints: dict[str, str],
    *,
    progress: bool = False,
) -> CueTable:
    """The acquisition cues of `ids` (in that order), from the cache in `store_dir` where the
    fingerprint matches, measured from `source` (and added to the cache) otherwise.

    Args:
        store_dir: the feature store folder holding (or to hold) `acquisition-cues.npz`.
        source: the images (None: only cached cues are given; the others are NaN, listed in
            `failures`).
        ids: the ids, each once.
        fingerprints: {id: the fingerprint the store recorded for its image}; an id without
            one is keyed by "" (reused until it gets one).
        progress: a tqdm bar while measuring.

    Returns:
        A CueTable (frame indexed by id; NaN rows for images that could not be read, with their
        reason in `failures`); `seconds` is the time spent measuring, 0 when all were cached.

    Raises:
        EmbedError: `ids` repeats an id (from `acquisition_cues`).
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):  # checked here too: cached rows never reach acquisition_cues
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise EmbedError(
            f"cached_cues: ids repeat {repeated[:3]} ({len(repeated)} ids); pass each id once"
        )
    path = Path(store_dir) / CUE_CACHE
    cache = _read_cache(path)
    values = np.full((len(ids), len(CUE_NAMES)), np.nan)
    todo: list[str] = []
    for row, image_id in enumerate(ids):
        hit = cache.get(image_id)
        if hit is not None and hit[0] == fingerprints.get(image_id, ""):
            values[row] = hit[1]
        else:
            todo.append(image_id)
    failures: dict[str, str] = {}
    seconds = 0.0
    if todo and source is None:
        failures = dict.fromkeys(todo, "image source not available and cues not cached")
        log.warning(
            "acquisition cues: %d of %d images are neither cached in %s nor readable (no image "
            "source): their acquisition part is left out",
            len(todo),
            len(ids),
            path,
        )
    elif todo and source is not None:  # a None source was handled above
        log.info(
            "acquisition cues: %d of %d images cached in %s; measuring %d",
            len(ids) - len(todo),
            len(ids),
            path,
            len(todo),
        )
        measured = acquisition_cues(source, todo, progress=progress)
        seconds, failures = measured.seconds, dict(measured.failures)
        position = {image_id: row for row, image_id in enumerate(ids)}
        fresh = measured.frame.to_numpy(dtype=np.float64)
        for image_id, row_values in zip(todo, fresh, strict=True):
            values[position[image_id]] = row_values
            if np.isfinite(row_values).all():  # an unreadable image is tried again next time
                cache[image_id] = (fingerprints.get(image_id, ""), row_values)
        _write_cache(path, cache)
    frame = pd.DataFrame(values, index=pd.Index(ids, name="id"), columns=list(CUE_NAMES))
    return CueTable(frame=frame, failures=failures, seconds=seconds)
