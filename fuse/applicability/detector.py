"""Applicability: is a scored row like the lesions the run was trained on?

A probability learnt on dermoscopy need not hold for a crop of a total-body photograph, and a
model cannot tell by itself. This module joins the parts into the detector (`Applicability`),
fits it out of fold from a run's training rows (`fit_applicability`), and saves and loads it
(`load`). The detector has up to three parts, each a raw "how unusual" score in a module of its
own beside this one:

- image (`image_part`; the default, `image_method="pca-residual"`): the norm of the
  l2-normalised embedding's residual outside the 16 leading principal directions of the
  normalised training embeddings (fitted on a seeded subsample of at most `max_reference` rows,
  20,000; saved as the mean and the directions, 64 KB at 1,024 dimensions). It separated the
  ISIC 2024 crops from held-out HAM10000 lesions better than the k-nearest-neighbour distance on
  the full HAM10000 store (see `ResidualImagePart`). `image_method="knn"`: the embedding's cosine
  distance to its k nearest training embeddings (l2-normalised, not centred: the pooled features
  are non-negative and their overall direction is part of what an image of another kind
  changes; 1 - the mean of the k = 5 largest similarities), against a reference set of at most
  20,000 rows in float16 (41 MB).
- acquisition (`acquisition_part`): the image file's acquisition cues (`embed.acquisition`)
  against the training images': each cue robustly standardised (median, 1.4826 x MAD, with a
  floor so that a cue every training image shares, such as a fixed size, still counts when it
  changes), then the Mahalanobis distance under a Ledoit-Wolf covariance of those standardised
  cues.
- metadata (`metadata_part`): numeric values beyond the training range widened by a margin
  (`numeric_margin` of the range on each side; the excess in units of the range) plus one per
  category never seen at fit.

The inputs are checked and shaped by `inputs`, the settings are `config.ApplicabilityConfig`.
Each raw score is turned into a percentile (`percentiles`) of the training rows' own out-of-fold
scores: for each fold of the run's `folds.csv` the parts are fitted on the other folds and score
the held-out one. A row's combined score is the largest of its part percentiles; `novelty` is
where that falls among the training rows' out-of-fold combined scores (0.99 = more unusual than
99% of them), and `unlike_training` is novelty at or above the threshold that marks
`marked_share` (2.5%) of the training rows out of fold. `reason` names the parts that alone
reach it.

Saved without pickles: `applicability.json` (settings, the store identity it was fitted on, the
parts' statistics, the hash of the arrays) and `applicability.npz` (read with
`allow_pickle=False`). `load(stage_dir).predict(embeddings, cues, metadata)` scores new rows.
A tabular-only run (no images) fits the metadata part alone.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.files import atomic_write, atomic_write_json, sha256_file
from embed.identity import IDENTITY_FIELDS, check_identity, identity_of
from fuse.applicability.acquisition_part import AcquisitionPart
from fuse.applicability.config import ApplicabilityConfig
from fuse.applicability.image_part import image_part_class
from fuse.applicability.inputs import cue_frame, embedding_matrix, metadata_frame
from fuse.applicability.metadata_part import MetadataPart
from fuse.applicability.percentiles import combine, marking_threshold, pct_label, percentile
from runfolder.errors import RunError

__all__ = [
    "ARRAYS",
    "FORMAT",
    "PARTS",
    "RECORD",
    "Applicability",
    "ApplicabilityConfig",
    "fit_applicability",
    "load",
]

log = logging.getLogger(__name__)

FORMAT = "lesionfuse-applicability/1"
RECORD = "applicability.json"
ARRAYS = "applicability.npz"
PARTS: tuple[str, ...] = ("image", "acquisition", "metadata")


# -- the detector --------------------------------------------------------------------------------


class Applicability:
    """A fitted detector; `predict` scores rows, `summary` describes the fit for a report."""

    def __init__(self, record: dict, parts: dict, oof: dict[str, np.ndarray]):
        self.record = record
        self.parts = parts  # name -> part, in PARTS order
        self.oof = {k: np.sort(v[np.isfinite(v)]) for k, v in oof.items()}
        self.threshold = float(record["threshold"])

    @property
    def identity(self) -> dict | None:
        """The embedding identity of the store it was fitted on (None for tabular-only)."""
        return self.record.get("identity")

    @property
    def training_novelty(self) -> np.ndarray:
        """The training rows' out-of-fold novelty, sorted (for the report's distribution)."""
        return self.oof["novelty"]

    def summary(self) -> dict:
        """Plain values: parts, rows, threshold, the share marked out of fold (all and per part)."""
        keep = (
            "parts",
            "rows",
            "folds",
            "threshold",
            "marked_share",
            "marked_share_out_of_fold",
            "marked_by_part_out_of_fold",
            "fit_seconds",
            "identity",
            "config",
        )
        return {k: self.record[k] for k in keep if k in self.record}

    def check_identity(self, identity: dict) -> None:
        """Raise StoreMismatchError naming the first field where `identity` (a store's
        `reference()` or identity) differs from the store the detector was fitted on; RunError
        when the detector was fitted without embeddings (it has no store to compare with)."""
        fitted = self.identity
        if fitted is None:
            raise RunError(
                "applicability detector: fitted without embeddings (parts "
                f"{list(self.parts)}), so it has no feature store to check identity against; "
                "score this run's rows without embeddings"
            )
        check_identity(
            identity_of(identity),
            fitted,
            "the embeddings to score (feature store)",
            "the applicability detector was fitted on",
        )

    def predict(
        self,
        embeddings=None,
        cues=None,
        metadata: pd.DataFrame | None = None,
        *,
        identity: dict | None = None,
    ) -> pd.DataFrame:
        """Score rows: DataFrame with `novelty` (0..1), `unlike_training` (bool), `reason`
        (empty unless unlike training) and `novelty_<part>` per fitted part, one row per input
        row (the metadata's index when given).

        embeddings: (rows, dim) or (rows, views, dim), required when the detector has an image
            part, with `identity` (the store's identity or `reference()`), checked against the
            fit's. cues: CueTable, DataFrame or (rows, len(CUE_NAMES)) array, required with an
            acquisition part. metadata: DataFrame holding the fitted columns, required with a
            metadata part. Rows whose embedding or cues are NaN (images that could not be read)
            are scored by the other parts; a row no part could score has NaN novelty and is
            not marked.

        Raises RunError naming the missing input or column, or a shape that does not fit;
        StoreMismatchError naming the identity field that differs.
        """
        n = None
        inputs = {"image": embeddings, "acquisition": cues, "metadata": metadata}
        for name in self.parts:
            if inputs[name] is None:
                what = {
                    "image": "embeddings (and identity)",
                    "acquisition": "cues",
                    "metadata": "metadata",
                }[name]
                raise RunError(
                    f"applicability.predict: the detector has a {name} part; pass {what}"
                )
            n = len(inputs[name]) if n is None else n
        percentiles = {}
        matrices = {}
        if "image" in self.parts:
            if identity is None:
                raise RunError(
                    "applicability.predict: identity is required with embeddings (the feature "
                    "store's reference() or identity), so that vectors of other weights are refused"
                )
            self.check_identity(identity)
            x = embedding_matrix(embeddings, n, "applicability.predict")
            expected = self.parts["image"].dim
            if x.shape[1] != expected:
                raise RunError(
                    f"applicability.predict: embeddings have dim {x.shape[1]}, the detector "
                    f"{expected}"
                )
            matrices["image"] = x
        if "acquisition" in self.parts:
            matrices["acquisition"] = cue_frame(cues, n, "applicability.predict")
        if "metadata" in self.parts:
            matrices["metadata"] = metadata_frame(
                metadata, self.parts["metadata"].columns, n, "applicability.predict"
            )
        for name, part in self.parts.items():
            percentiles[name] = percentile(self.oof[name], part.score(matrices[name]))
        combined = combine(percentiles)
        novelty = percentile(self.oof["combined"], combined)
        unlike = np.nan_to_num(novelty, nan=0.0) >= self.threshold
        reasons = [""] * len(novelty)
        for i in np.flatnonzero(unlike):
            reasons[i] = self._reason(int(i), percentiles, matrices)
        index = (
            metadata.index if isinstance(metadata, pd.DataFrame) else pd.RangeIndex(len(novelty))
        )
        out = pd.DataFrame(
            {"novelty": novelty, "unlike_training": unlike, "reason": reasons}, index=index
        )
        for name, p in percentiles.items():
            out[f"novelty_{name}"] = p
        return out

    def _reason(self, i: int, percentiles: dict, matrices: dict) -> str:
        words = []
        for name, part in self.parts.items():
            p = percentiles[name][i]
            if (
                not np.isfinite(p)
                or percentile(self.oof["combined"], np.array([p]))[0] < self.threshold
            ):
                continue
            matrix = matrices[name]
            row = matrix.iloc[[i]] if isinstance(matrix, pd.DataFrame) else matrix[i]
            detail = part.detail(row)
            pct = pct_label(p)
            if name == "image":
                words.append(f"image unlike training ({pct})")
            else:
                words.append(f"{name} ({pct}): {detail}" if detail else f"{name} ({pct})")
        return "; ".join(words)


def _fit_parts(rows: np.ndarray, inputs: dict, numeric, categorical, config, rng) -> dict:
    # Each part reads its own kind of input (a matrix, a frame), so they share no one type.
    parts: dict[str, Any] = {}
    if inputs.get("image") is not None:
        parts["image"] = image_part_class(config.image_method).fit(
            inputs["image"][rows], config, rng
        )
    if inputs.get("acquisition") is not None:
        parts["acquisition"] = AcquisitionPart.fit(inputs["acquisition"].iloc[rows], config, rng)
    if inputs.get("metadata") is not None:
        parts["metadata"] = MetadataPart.fit(
            inputs["metadata"].iloc[rows], numeric, categorical, config
        )
    return parts


def fit_applicability(
    stage_dir: Path | str,
    folds: Sequence[int] | np.ndarray,
    *,
    embeddings=None,
    identity: dict | None = None,
    cues=None,
    metadata: pd.DataFrame | None = None,
    numeric: Sequence[str] = (),
    categorical: Sequence[str] = (),
    config: ApplicabilityConfig | None = None,
) -> Applicability:
    """Fit the detector on a run's training rows and save it in `stage_dir`.

    All inputs hold the same rows in the same order (the run's `folds.csv` order):
    folds: (rows,) fold of each row (at least 2 distinct folds; rows of one group share one).
    embeddings: (rows, dim) or (rows, views, dim) from the run's feature store, with
        `identity` (the store's `reference()` or identity; recorded and checked at predict).
    cues: acquisition cues of the same images (`embed.acquisition.acquisition_cues`).
    metadata: DataFrame holding the `numeric` and `categorical` columns.
    At least one of embeddings, cues and (metadata with columns) is needed; a tabular-only run
    passes metadata alone.

    Returns the fitted `Applicability` (also saved: `applicability.json` + `.npz`). Raises
    RunError naming the input that is missing, misshapen or holds too few folds.
    """
    started = time.perf_counter()
    config = config or ApplicabilityConfig()
    folds = np.asarray(folds)
    n = len(folds)
    unique_folds = np.unique(folds)
    if len(unique_folds) < 2:
        raise RunError(
            f"fit_applicability: folds must hold at least 2 distinct folds (out-of-fold scores "
            f"set the threshold), got {list(unique_folds)}"
        )
    inputs = _fit_inputs(n, embeddings, identity, cues, metadata, list(numeric) + list(categorical))
    rng = np.random.default_rng(config.seed)
    oof_raw = _out_of_fold_scores(inputs, folds, numeric, categorical, config, rng)
    oof = {name: np.sort(v[np.isfinite(v)]) for name, v in oof_raw.items()}
    oof_pct = {name: percentile(oof[name], v) for name, v in oof_raw.items()}
    combined = combine(oof_pct)
    oof["combined"] = np.sort(combined[np.isfinite(combined)])
    novelty = percentile(oof["combined"], combined)
    oof["novelty"] = np.sort(novelty[np.isfinite(novelty)])
    threshold, marked = marking_threshold(novelty, config.marked_share)
    by_part = {
        name: float(
            np.mean(
                percentile(oof["combined"], oof_pct[name][np.isfinite(oof_pct[name])]) >= threshold
            )
        )
        for name in inputs
    }
    parts = _fit_parts(np.arange(n), inputs, numeric, categorical, config, rng)
    record = {
        "format": FORMAT,
        "config": asdict(config),
        "parts": list(parts),
        "rows": int(n),
        "folds": [int(f) if np.issubdtype(type(f), np.integer) else str(f) for f in unique_folds],
        "identity": (
            {k: v for k, v in identity_of(identity).items() if k in IDENTITY_FIELDS}
            if "image" in inputs and identity is not None
            else None  # checked above: both or neither
        ),
        "threshold": threshold,
        "marked_share": config.marked_share,
        "marked_share_out_of_fold": float(marked),
        "marked_by_part_out_of_fold": by_part,
        "fit_seconds": round(time.perf_counter() - started, 3),
    }
    detector = Applicability(record, parts, oof)
    _save(Path(stage_dir), detector)
    log.info(
        "applicability: fitted %s on %d rows in %.1f s; threshold %.4f marks %.2f%% out of fold",
        "+".join(parts),
        n,
        record["fit_seconds"],
        threshold,
        100 * marked,
    )
    return detector


def _fit_inputs(
    n: int, embeddings, identity: dict | None, cues, metadata, columns: list[str]
) -> dict:
    """{part name: its input, checked and shaped} for the parts there is something to fit on.

    Raises RunError for embeddings without an identity, a misshapen input, or nothing to fit.
    """
    inputs: dict = {}
    if embeddings is not None:
        if identity is None:
            raise RunError(
                "fit_applicability: identity is required with embeddings (the feature store's "
                "reference()), so that the detector refuses vectors of other weights"
            )
        inputs["image"] = embedding_matrix(embeddings, n, "fit_applicability")
    if cues is not None:
        inputs["acquisition"] = cue_frame(cues, n, "fit_applicability")
    if metadata is not None and columns:
        inputs["metadata"] = metadata_frame(metadata, columns, n, "fit_applicability")
    if not inputs:
        raise RunError(
            "fit_applicability: nothing to fit on; pass embeddings, cues, or metadata with "
            "numeric/categorical columns"
        )
    return inputs


def _out_of_fold_scores(
    inputs: dict,
    folds: np.ndarray,
    numeric: Sequence[str],
    categorical: Sequence[str],
    config: ApplicabilityConfig,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """{part name: (rows,) raw score of each row by the part fitted on the other folds}; NaN
    where the part could not score the row."""
    oof_raw = {name: np.full(len(folds), np.nan) for name in inputs}
    for fold in np.unique(folds):
        held = folds == fold
        parts = _fit_parts(np.flatnonzero(~held), inputs, numeric, categorical, config, rng)
        for name, part in parts.items():
            matrix = inputs[name]
            rows = (
                matrix.iloc[np.flatnonzero(held)]
                if isinstance(matrix, pd.DataFrame)
                else matrix[held]
            )
            oof_raw[name][held] = part.score(rows)
    return oof_raw


def _save(stage_dir: Path, detector: Applicability) -> None:
    """Arrays first, then the record naming their hash: a reader sees a matching pair or
    refuses a half-written one."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"oof_{k}": v for k, v in detector.oof.items()}
    states = {}
    for name, part in detector.parts.items():
        state, part_arrays = part.state()
        states[name] = state
        arrays.update(part_arrays)

    def write(f) -> None:
        buffer = io.BytesIO()
        # numpy's stub types **kwds against savez's keyword `allow_pickle: bool` too; the
        # values are arrays, as savez takes them
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        f.write(buffer.getvalue())

    atomic_write(stage_dir / ARRAYS, write)
    record = {
        **detector.record,
        "part_states": states,
        "arrays_sha256": sha256_file(stage_dir / ARRAYS),
    }
    detector.record = record
    atomic_write_json(stage_dir / RECORD, record)


_PART_CLASSES: dict[str, type[AcquisitionPart] | type[MetadataPart]] = {
    "acquisition": AcquisitionPart,
    "metadata": MetadataPart,
}


def load(stage_dir: Path | str) -> Applicability:
    """The detector saved in `stage_dir` by `fit_applicability`.

    Raises RunError naming the file when it is absent, of another format, or when the arrays do
    not match the record (a write interrupted between the two files): fit it again.
    """
    stage_dir = Path(stage_dir)
    record_path, arrays_path = stage_dir / RECORD, stage_dir / ARRAYS
    for path in (record_path, arrays_path):
        if not path.is_file():
            raise RunError(
                f"applicability detector: {str(path)!r} is missing; fit it with "
                "fuse.applicability.fit_applicability (invoke stack)"
            )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"applicability detector: cannot read {str(record_path)!r}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise RunError(
            f"applicability detector: {str(record_path)!r} has format {found!r}, expected "
            f"{FORMAT!r}; fit it again"
        )
    if sha256_file(arrays_path) != record.get("arrays_sha256"):
        raise RunError(
            f"applicability detector: {str(arrays_path)!r} does not match the sha256 recorded in "
            f"{str(record_path)!r} (an interrupted or altered write); fit it again"
        )
    with np.load(arrays_path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    parts = {}
    for name in record["parts"]:
        state = record["part_states"][name]
        cls = (
            image_part_class(state.get("method", "knn")) if name == "image" else _PART_CLASSES[name]
        )
        parts[name] = cls.from_state(state, arrays)
    oof = {k[len("oof_") :]: v for k, v in arrays.items() if k.startswith("oof_")}
    return Applicability(record, parts, oof)
