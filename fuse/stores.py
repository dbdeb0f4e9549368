"""A spec's feature store: where it lives, opening it for training, and recording which one a
stage read.

The spec (tabular) says which ids a data set has and where its images are; the store (embed)
knows nothing of specs. This module joins the two for every stage that reads embeddings, so that
each of them refuses the same things with the same words:

- a row without a vector (never embedded, or unreadable: the message names `--retry-failed` and
  writes the ids with their reasons to a file, so those rows can be left out);
- a vector made from another version of its image (the image's size or modification time, or its
  HDF5 bytes, changed since it was embedded: "stale vectors");
- a store whose embedding identity differs from the one another stage of the same run was
  trained on (`<stage>/store.json`), naming the field;
- two stages of one run that read different vectors for its rows (`run_identity`): each stage
  records in its `store.json`, under "read", a digest of what it read (`rows_digest`).

The digest is taken over the vectors themselves (the run's ids in row order, then every view of
every row's vector as the store holds it), not over the store's per-id image fingerprints:
it names exactly what a model learnt from, whatever produced the vectors (a re-embed with new
images, a `--retry-failed`, a store rebuilt under the same name, a fingerprint that missed a
change), and costs one memory-mapped read of the rows (about half the time of the mean-embedding
read a stage does anyway; measured figures live with the measurement). Fingerprints say
whether an image changed since it was embedded; the digest says whether two stages saw the
same numbers.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from common.errors import preview
from embed.config import EmbedConfig
from embed.errors import StoreMismatchError
from embed.identity import check_identity, identity_of
from embed.sources import open_source
from embed.store import FeatureStore
from embed.store_format import store_candidates, store_name
from embed.weights import WeightsInfo, ensure_weights
from runfolder.errors import RunError
from runfolder.layout import RunLayout
from runfolder.paths import stores_root
from runfolder.records import different_rows, store_records, write_unembedded
from tabular.spec import DatasetSpec

log = logging.getLogger(__name__)

# Rows read from a store at once when a whole data set is averaged over views (bounded memory).
_READ_ROWS = 8192


def store_path(
    spec: DatasetSpec, weights: WeightsInfo, config: EmbedConfig, stores: Path | None = None
) -> Path:
    """Where the store for (data set, weights, image size, views, the zoom view, pooled blocks,
    and the variant when it is not faithful) lives."""
    name = store_name(
        spec.name,
        weights.sha256,
        config.image_size,
        config.views,
        config.blocks,
        config.pooling,
        config.variant,
        config.zoom,
    )
    return (stores or stores_root()) / name


def locate_store(
    spec: DatasetSpec, weights: WeightsInfo | None = None, stores: Path | None = None
) -> Path:
    """The spec's feature store for the current weights.

    Prefers the store of the default settings (224 px, one view, the default blocks and pooling)
    when several exist; otherwise there must be exactly one. Raises RunError naming the command
    that makes one, or the candidates to choose from.
    """
    weights = weights or ensure_weights()
    root = stores or stores_root()
    preferred = store_path(spec, weights, EmbedConfig(), root)
    # Same data set and weights, any image size, views, blocks or variant.
    candidates = store_candidates(root, spec.name, weights.sha256)
    if not candidates:
        raise RunError(
            f"no feature store for data set '{spec.name}' with weights {weights.sha256[:12]} "
            f"under {root}; "
            f"make it with `invoke embed --spec {_spec_argument(spec)}`"
        )
    if preferred in candidates:
        return preferred
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise RunError(
            f"several feature stores for '{spec.name}': {names}; choose one with --store"
        )
    return candidates[0]


def _spec_argument(spec: DatasetSpec) -> str:
    """What to pass as `--spec` to mean this spec again."""
    return str(spec.source or spec.root)


@dataclass(frozen=True)
class SpecStore:
    """A store opened for a spec's rows: every row has a vector made from its current image."""

    store: FeatureStore
    ids: list[str]

    @cached_property
    def reference(self) -> dict:
        """What a stage records as the store it read: identity fields, folder, uid, rows, and
        under "read" the digest of the vectors of `ids` (`rows_digest`; computed once)."""
        return {**self.store.reference(), "read": rows_digest(self.store, self.ids)}

    def mean_embeddings(self) -> np.ndarray:
        """(n_rows, dim) float32: each row's embedding averaged over views, in the spec's row
        order."""
        out = np.empty((len(self.ids), self.store.dim), dtype=np.float32)
        for start in range(0, len(self.ids), _READ_ROWS):
            block = self.store.read(self.ids[start : start + _READ_ROWS])
            out[start : start + _READ_ROWS] = block.astype(np.float32).mean(axis=1)
        return out


def rows_digest(store: FeatureStore, ids: list[str]) -> dict:
    """{"rows", "ids_sha256", "vectors_sha256"}: what a stage read from `store` for `ids`.

    `ids_sha256` covers the ids in the given (row) order; `vectors_sha256` the stored vectors of
    those rows in that order, every view, in the store's dtype, read `_READ_ROWS` at a time.
    """
    vectors = hashlib.sha256()
    for start in range(0, len(ids), _READ_ROWS):
        vectors.update(np.ascontiguousarray(store.read(ids[start : start + _READ_ROWS])).tobytes())
    return {
        "rows": len(ids),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "vectors_sha256": vectors.hexdigest(),
    }


def open_for_training(
    spec: DatasetSpec,
    ids: list[str],
    store_dir: Path | str | None = None,
    run: RunLayout | None = None,
) -> SpecStore:
    """Open the store holding `ids` (the spec's rows) and check that training may use it.

    Args:
        spec: the data set (its image source is checked for changed images).
        ids: the rows' ids, in the order the stage will read them.
        store_dir: the store folder (default: `locate_store(spec)`).
        run: when given, unembedded ids are written to `<run>/unembedded-ids.csv`
            (`runfolder.records`).

    Raises:
        RunError: no store there; ids without a vector (names how many, the first few, the reason
            of the first, `--retry-failed`, and the file listing them all); ids whose image changed
            since it was embedded (names them and the command that embeds them again).
        StoreMismatchError: the store's manifests disagree.
    """
    store_dir = Path(store_dir) if store_dir is not None else locate_store(spec)
    if not store_dir.is_dir():
        raise RunError(
            f"store: no feature store at {store_dir}; make it with "
            f"`invoke embed --spec {_spec_argument(spec)}`"
        )
    store = FeatureStore.open(store_dir)
    _require_vectors(spec, ids, store, run)
    _require_current(spec, ids, store)
    return SpecStore(store=store, ids=list(ids))


def _require_vectors(
    spec: DatasetSpec, ids: list[str], store: FeatureStore, run: RunLayout | None
) -> None:
    missing = store.missing(ids)
    if not missing:
        return
    failures = store.failures
    failed = [i for i in missing if i in failures]
    listing = ""
    if run is not None:
        write_unembedded(run, spec.id, ((i, failures.get(i, "not embedded yet")) for i in missing))
        listing = f" (all {len(missing)} are listed in {run.unembedded_ids})"
    what = (
        f"store {store.path} lacks {len(missing)} of the run's {len(ids)} ids ({preview(missing)})"
    )
    if failed:
        raise RunError(
            f"{what}; {len(failed)} of them could not be embedded, e.g. {failed[0]}: "
            f"{failures[failed[0]]}{listing}; try them again with "
            f"`invoke embed --spec {_spec_argument(spec)} --retry-failed`; to train without them, "
            f"remove their rows from {spec.metadata} (a new --run, since a run's rows are fixed)"
        )
    raise RunError(f"{what}; embed them with `invoke embed --spec {_spec_argument(spec)}`{listing}")


def _require_current(spec: DatasetSpec, ids: list[str], store: FeatureStore) -> None:
    """Refuse vectors made from an earlier version of their image."""
    if not spec.images:
        return
    if not Path(spec.images).exists():
        # The vectors are what training needs; without the images there is nothing to compare.
        log.warning(
            "the spec's images (%s) are not there: the store's vectors are used without "
            "checking that they match the current images",
            spec.images,
        )
        return
    changed = store.changed(open_source(spec.images), ids)
    if changed:
        raise RunError(
            f"store {store.path}: {len(changed)} image(s) changed since they were embedded "
            f"({preview(changed)}); embed them again with `invoke embed --spec "
            f"{_spec_argument(spec)}`"
        )


# ------------------------------------------------------------------ what each stage was trained on
# The records themselves (`<stage>/store.json`: writing, listing, the digest comparison) belong to
# `runfolder.records`; comparing their identity fields is the image side's (`embed.identity`).


def check_same_embeddings(
    run: RunLayout, identity: dict, what: str, *, skip: str | None = None
) -> None:
    """Refuse `identity` when a stage of `run` (other than `skip`) was trained on other embeddings.

    `what` names the embeddings being checked in the message (e.g. "feature store '/s'").

    Raises:
        StoreMismatchError: names the field, the stage and both values.
    """
    for stage, record in store_records(run).items():
        if stage == skip:
            continue
        check_identity(
            identity,
            identity_of(record),
            what,
            f"stage '{stage}' of run {run.dir} was trained on",
            hint="use the store that stage was trained on (its store.json names it), "
            "or retrain that stage on this one",
        )


def run_identity(run: RunLayout) -> dict | None:
    """The embedding identity every image-reading stage of `run` was trained on (None: none read
    images).

    Also checks that those stages read the same vectors for the run's rows (the "read" digest of
    their `store.json`); a stage recorded before digests existed is not compared (logged).

    Raises:
        StoreMismatchError: two stages were trained on different embeddings (names the field
            and both stages): their models would need two embeddings of one image; or they
            read different vectors (or rows) from the same store: names both stages, what
            differs, and the command that retrains the older one.
    """
    records = store_records(run)
    if not records:
        return None
    (first_stage, first), *others = records.items()
    for stage, record in others:
        check_identity(
            identity_of(record),
            identity_of(first),
            f"stage '{stage}' of run {run.dir}",
            f"stage '{first_stage}' was trained on",
            hint="retrain one stage on the other's store (`--store`)",
        )
    mismatch = different_rows(run, records)
    if mismatch:
        raise StoreMismatchError(mismatch)
    return identity_of(first)


__all__ = [
    "SpecStore",
    "StoreMismatchError",
    "check_same_embeddings",
    "locate_store",
    "open_for_training",
    "rows_digest",
    "run_identity",
    "store_path",
]
