"""Metadata -> model features: one-hot, numeric, engineered lesion and per-patient features.

`FeatureEncoder` is fitted on the training part of a fold and applied to any rows later
(validation rows, new rows at scoring time). What it learns at fit is only the vocabulary of each
categorical column and, for the MLP matrix, each continuous column's mean and standard deviation;
it never reads the target or any column outside `spec.feature_columns` (plus the patient column,
used as a grouping key only). It is stored as JSON (`to_json` / `from_json`), never pickled.

Feature blocks, in this column order:
1. the spec's numeric columns (NaN kept: LightGBM routes missing values itself);
2. for the built-in ISIC 2024 spec, engineered lesion features from the `tbp_lv_*` columns, as
   the public solutions of the ISIC 2024 Challenge computed them (ratios of size, shape, colour
   and border measurements of the 3D total-body-photography lesion segmentation);
3. only when `spec.patient` is set: each numeric and engineered feature normalised within its
   patient, `(x - patient mean) / (patient std + eps)`, and the number of the patient's lesions in
   the rows given. A malignant lesion tends to look unlike the patient's other lesions (the
   "ugly duckling" sign); these figures come from the rows given to `transform` only, so at
   scoring time they come from the scored rows of that patient;
4. one-hot columns of each categorical column (plus a `<column>__missing` indicator); a
   category not seen at fit becomes all-zero and is counted in a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pandas as pd

from tabular.errors import DataError, preview
from tabular.spec import DatasetSpec

log = logging.getLogger(__name__)

# Categories not seen at fit, per column, while `unknown_categories_said_once` is open: every fold
# model has its own encoder and scoring runs in batches, so a warning per `transform` call said
# the same thing 5-10 times. A context variable, not a module global, so that threads and nested
# calls each see their own collection.
_UNKNOWN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("unknown_categories", default=None)


@contextlib.contextmanager
def unknown_categories_said_once() -> Iterator[None]:
    """Collect the categories `FeatureEncoder.transform` meets that its fit did not see, and log
    them once per column when the outermost such block ends: the rows holding them (distinct ids,
    over every batch), the encoder calls (e.g. one per fold model) that had not seen them, and the
    values.

    Usable as a decorator. Nested blocks add to the outermost one.
    """
    if _UNKNOWN.get() is not None:
        yield
        return
    token = _UNKNOWN.set({})
    try:
        yield
    finally:
        collected = _UNKNOWN.get()
        _UNKNOWN.reset(token)
        for column, seen in collected.items():
            if not seen["ids"]:
                continue
            log.warning(
                "categorical column '%s': %d row(s) hold categories not seen at fit (by %d of %d encoder "
                "calls, e.g. one per fold model), encoded as all-zero: %s",
                column, len(seen["ids"]), seen["calls_unknown"], seen["calls"], preview(sorted(seen["values"])),
            )


def _note_unknown(column: str, values: list, ids: list[str]) -> bool:
    """Count one transform of `column` (and the ids and values it did not know) in the open
    collection; False when none is open and the caller logs itself."""
    collected = _UNKNOWN.get()
    if collected is None:
        return False
    seen = collected.setdefault(column, {"ids": set(), "calls": 0, "calls_unknown": 0, "values": set()})
    seen["calls"] += 1
    if ids:
        seen["calls_unknown"] += 1
        seen["ids"].update(ids)
        seen["values"].update(values)
    return True

ENCODER_FORMAT = 1
# A categorical column with more distinct values than this is almost surely an id or free text.
MAX_CATEGORIES = 1000
# Added to a patient's standard deviation, as in the public ISIC 2024 notebooks, so that a feature
# constant within a patient gives 0 rather than a division by zero.
PATIENT_EPS = 1e-5
# Per-patient statistics are computed this many columns at a time to bound temporary memory.
_PATIENT_CHUNK = 16

Arrays = Mapping[str, np.ndarray]


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, NaN where b is zero or missing (a zero-size lesion is a measurement failure)."""
    out = np.full(np.broadcast(a, b).shape, np.nan)
    np.divide(a, b, out=out, where=np.isfinite(b) & (b != 0))
    return out


def _delta_norm(c: Arrays) -> np.ndarray:
    return np.sqrt(c["tbp_lv_deltaA"] ** 2 + c["tbp_lv_deltaB"] ** 2 + c["tbp_lv_deltaL"] ** 2)


def _distance_3d(c: Arrays) -> np.ndarray:
    return np.sqrt(c["tbp_lv_x"] ** 2 + c["tbp_lv_y"] ** 2 + c["tbp_lv_z"] ** 2)


def _border_complexity(c: Arrays) -> np.ndarray:
    return c["tbp_lv_norm_border"] + c["tbp_lv_symm_2axis"]


def _shape_index(c: Arrays) -> np.ndarray:
    return _div(c["tbp_lv_areaMM2"], c["tbp_lv_perimeterMM"] ** 2)


def _log1p(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape, np.nan)
    np.log1p(x, out=out, where=x > -1)
    return out


def _sqrt(x: np.ndarray) -> np.ndarray:
    out = np.full(x.shape, np.nan)
    np.sqrt(x, out=out, where=x >= 0)
    return out


# Engineered ISIC 2024 features: (name, input columns, function). Written from the descriptions in
# the public notebook "ISIC 2024 | Only Tabular Data" and the 1st/2nd place write-ups. A feature is
# built only when all its inputs are features of the spec (an excluded input drops it).
_ENGINEERED: tuple[tuple[str, tuple[str, ...], Callable[[Arrays], np.ndarray]], ...] = (
    # Short axis over longest diameter: 1 for a round lesion, small for an elongated one.
    ("lesion_size_ratio", ("tbp_lv_minorAxisMM", "clin_size_long_diam_mm"),
     lambda c: _div(c["tbp_lv_minorAxisMM"], c["clin_size_long_diam_mm"])),
    # Area over squared perimeter: compactness, largest (1 / 4 pi) for a disc, small for a ragged outline.
    ("lesion_shape_index", ("tbp_lv_areaMM2", "tbp_lv_perimeterMM"), _shape_index),
    # How much the lesion's hue differs from the skin around it.
    ("hue_contrast", ("tbp_lv_H", "tbp_lv_Hext"), lambda c: np.abs(c["tbp_lv_H"] - c["tbp_lv_Hext"])),
    # How much darker or lighter the lesion is than the skin around it.
    ("luminance_contrast", ("tbp_lv_L", "tbp_lv_Lext"),
     lambda c: np.abs(c["tbp_lv_L"] - c["tbp_lv_Lext"])),
    # Saturation (chroma) difference between lesion and surrounding skin.
    ("chroma_contrast", ("tbp_lv_C", "tbp_lv_Cext"), lambda c: np.abs(c["tbp_lv_C"] - c["tbp_lv_Cext"])),
    # Euclidean colour distance (CIELAB) between lesion and surrounding skin.
    ("lesion_color_difference", ("tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL"), _delta_norm),
    # Border irregularity plus asymmetry: the "B" and "A" of the ABCD rule together.
    ("border_complexity", ("tbp_lv_norm_border", "tbp_lv_symm_2axis"), _border_complexity),
    # Mean colour variation inside the lesion relative to its largest radial variation.
    ("color_uniformity", ("tbp_lv_color_std_mean", "tbp_lv_radial_color_std_max"),
     lambda c: _div(c["tbp_lv_color_std_mean"], c["tbp_lv_radial_color_std_max"])),
    # Distance of the lesion from the origin of the 3D body model (roughly: where on the body).
    ("3d_position_distance", ("tbp_lv_x", "tbp_lv_y", "tbp_lv_z"), _distance_3d),
    # Outline length per unit area: high for small or ragged lesions.
    ("perimeter_to_area_ratio", ("tbp_lv_perimeterMM", "tbp_lv_areaMM2"),
     lambda c: _div(c["tbp_lv_perimeterMM"], c["tbp_lv_areaMM2"])),
    # Area per unit outline length: grows with size for a given shape.
    ("area_to_perimeter_ratio", ("tbp_lv_areaMM2", "tbp_lv_perimeterMM"),
     lambda c: _div(c["tbp_lv_areaMM2"], c["tbp_lv_perimeterMM"])),
    # Contrast with the surrounding skin plus colour irregularity: how much the lesion stands out.
    ("lesion_visibility_score", ("tbp_lv_deltaLBnorm", "tbp_lv_norm_color"),
     lambda c: c["tbp_lv_deltaLBnorm"] + c["tbp_lv_norm_color"]),
    # Asymmetry and border irregularity that occur together.
    ("symmetry_border_consistency", ("tbp_lv_symm_2axis", "tbp_lv_norm_border"),
     lambda c: c["tbp_lv_symm_2axis"] * c["tbp_lv_norm_border"]),
    # Their product over their sum: large only when both are large (a harmonic-mean-like blend).
    ("consistency_symmetry_border", ("tbp_lv_symm_2axis", "tbp_lv_norm_border"),
     lambda c: _div(c["tbp_lv_symm_2axis"] * c["tbp_lv_norm_border"],
                    c["tbp_lv_symm_2axis"] + c["tbp_lv_norm_border"])),
    # Luminance spread inside the lesion relative to the surrounding skin's luminance.
    ("color_consistency", ("tbp_lv_stdL", "tbp_lv_Lext"), lambda c: _div(c["tbp_lv_stdL"], c["tbp_lv_Lext"])),
    # Product over sum of the same two.
    ("consistency_color", ("tbp_lv_stdL", "tbp_lv_Lext"),
     lambda c: _div(c["tbp_lv_stdL"] * c["tbp_lv_Lext"], c["tbp_lv_stdL"] + c["tbp_lv_Lext"])),
    # Luminance spread inside the lesion relative to that of the skin around it.
    ("stdl_ratio", ("tbp_lv_stdL", "tbp_lv_stdLExt"), lambda c: _div(c["tbp_lv_stdL"], c["tbp_lv_stdLExt"])),
    # Large lesions in older patients are the riskier ones.
    ("size_age_interaction", ("clin_size_long_diam_mm", "age_approx"),
     lambda c: c["clin_size_long_diam_mm"] * c["age_approx"]),
    # Hue weighted by colour variation inside the lesion.
    ("hue_color_std_interaction", ("tbp_lv_H", "tbp_lv_color_std_mean"),
     lambda c: c["tbp_lv_H"] * c["tbp_lv_color_std_mean"]),
    # Mean of border irregularity, colour irregularity and eccentricity.
    ("lesion_severity_index", ("tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_eccentricity"),
     lambda c: (c["tbp_lv_norm_border"] + c["tbp_lv_norm_color"] + c["tbp_lv_eccentricity"]) / 3),
    # Border complexity plus compactness.
    ("shape_complexity_index",
     ("tbp_lv_norm_border", "tbp_lv_symm_2axis", "tbp_lv_areaMM2", "tbp_lv_perimeterMM"),
     lambda c: _border_complexity(c) + _shape_index(c)),
    # Diameter per year of age: a large lesion in a young patient stands out.
    ("normalized_lesion_size", ("clin_size_long_diam_mm", "age_approx"),
     lambda c: _div(c["clin_size_long_diam_mm"], c["age_approx"])),
    # Named "difference" in the public notebook, but it is the mean hue of lesion and surroundings.
    ("mean_hue_difference", ("tbp_lv_H", "tbp_lv_Hext"), lambda c: (c["tbp_lv_H"] + c["tbp_lv_Hext"]) / 2),
    # Root-mean-square of the three CIELAB differences to the surrounding skin.
    ("std_dev_contrast", ("tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL"),
     lambda c: _delta_norm(c) / math.sqrt(3)),
    # Mean of colour variation, area/perimeter ratio and asymmetry.
    ("color_shape_composite_index", ("tbp_lv_color_std_mean", "tbp_lv_area_perim_ratio", "tbp_lv_symm_2axis"),
     lambda c: (c["tbp_lv_color_std_mean"] + c["tbp_lv_area_perim_ratio"] + c["tbp_lv_symm_2axis"]) / 3),
    # Area on a log scale (areas span orders of magnitude).
    ("log_lesion_area", ("tbp_lv_areaMM2",), lambda c: _log1p(c["tbp_lv_areaMM2"])),
    # Irregular border and irregular colour together.
    ("border_color_interaction", ("tbp_lv_norm_border", "tbp_lv_norm_color"),
     lambda c: c["tbp_lv_norm_border"] * c["tbp_lv_norm_color"]),
    # Their product over their sum.
    ("border_color_interaction_2", ("tbp_lv_norm_border", "tbp_lv_norm_color"),
     lambda c: _div(c["tbp_lv_norm_border"] * c["tbp_lv_norm_color"],
                    c["tbp_lv_norm_border"] + c["tbp_lv_norm_color"])),
    # Diameter per unit of contrast with the surrounding skin.
    ("size_color_contrast_ratio", ("clin_size_long_diam_mm", "tbp_lv_deltaLBnorm"),
     lambda c: _div(c["clin_size_long_diam_mm"], c["tbp_lv_deltaLBnorm"])),
    # The TBP software's "looks like a nevus" confidence per year of age.
    ("age_normalized_nevi_confidence", ("tbp_lv_nevi_confidence", "age_approx"),
     lambda c: _div(c["tbp_lv_nevi_confidence"], c["age_approx"])),
    # Named after the previous one in the public notebook; it is the length of (diameter, age).
    ("age_normalized_nevi_confidence_2", ("clin_size_long_diam_mm", "age_approx"),
     lambda c: np.sqrt(c["clin_size_long_diam_mm"] ** 2 + c["age_approx"] ** 2)),
    # Radial colour variation weighted by asymmetry.
    ("color_asymmetry_index", ("tbp_lv_radial_color_std_max", "tbp_lv_symm_2axis"),
     lambda c: c["tbp_lv_radial_color_std_max"] * c["tbp_lv_symm_2axis"]),
    # Area times distance from the body model's origin.
    ("volume_approximation_3d", ("tbp_lv_areaMM2", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z"),
     lambda c: c["tbp_lv_areaMM2"] * _distance_3d(c)),
    # Summed absolute L, A, B differences between lesion and surrounding skin.
    ("color_range", ("tbp_lv_L", "tbp_lv_Lext", "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext"),
     lambda c: np.abs(c["tbp_lv_L"] - c["tbp_lv_Lext"]) + np.abs(c["tbp_lv_A"] - c["tbp_lv_Aext"])
     + np.abs(c["tbp_lv_B"] - c["tbp_lv_Bext"])),
    # Elongation weighted by colour variation.
    ("shape_color_consistency", ("tbp_lv_eccentricity", "tbp_lv_color_std_mean"),
     lambda c: c["tbp_lv_eccentricity"] * c["tbp_lv_color_std_mean"]),
    # Perimeter over the circumference of the disc of equal area: 1 for a circle, more if ragged.
    ("border_length_ratio", ("tbp_lv_perimeterMM", "tbp_lv_areaMM2"),
     lambda c: _div(c["tbp_lv_perimeterMM"], 2 * np.pi * _sqrt(_div(c["tbp_lv_areaMM2"], np.pi)))),
    # Age x diameter x asymmetry: large asymmetric lesions in older patients.
    ("age_size_symmetry_index", ("age_approx", "clin_size_long_diam_mm", "tbp_lv_symm_2axis"),
     lambda c: c["age_approx"] * c["clin_size_long_diam_mm"] * c["tbp_lv_symm_2axis"]),
    # The same with area instead of diameter.
    ("index_age_size_symmetry", ("age_approx", "tbp_lv_areaMM2", "tbp_lv_symm_2axis"),
     lambda c: c["age_approx"] * c["tbp_lv_areaMM2"] * c["tbp_lv_symm_2axis"]),
)

# Engineered categorical: the coarse site and the TBP software's finer location in one value.
_COMBINED_SITE = ("combined_anatomical_site", ("anatom_site_general", "tbp_lv_location"))


def engineered_feature_names() -> tuple[str, ...]:
    """Names of all engineered numeric ISIC 2024 features (before any is dropped for inputs)."""
    return tuple(name for name, _, _ in _ENGINEERED)


def _safe(name: str) -> str:
    """A feature name LightGBM accepts (no JSON special characters or whitespace)."""
    return re.sub(r"[^0-9A-Za-z_.\-]+", "_", str(name)).strip("_") or "x"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        candidate = name
        while candidate in seen:
            seen[name] += 1
            candidate = f"{name}_{seen[name]}"
        seen.setdefault(candidate, 1)
        out.append(candidate)
    return out


class FeatureEncoder:
    """Turns a metadata frame into model features; see the module docstring for the blocks.

    Usage: `enc = FeatureEncoder().fit(train_df, spec)`, then `enc.transform(df)` (LightGBM) or
    `enc.mlp_matrix(enc.transform(df))` (a neural network). `enc.to_json()` stores it.
    """

    def __init__(self) -> None:
        self.state: dict | None = None

    # ----------------------------------------------------------------------------------- fit
    def fit(self, df: pd.DataFrame, spec: DatasetSpec) -> FeatureEncoder:
        """Learn the categories and the MLP standardisation; see `fit_transform`. Returns self."""
        self.fit_transform(df, spec)
        return self

    def fit_transform(self, df: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
        """Learn the categories of each categorical column and the MLP standardisation.

        Args:
            df: metadata rows (the training part of a fold); extra columns are ignored.
            spec: the data set's spec; only `spec.feature_columns` are read (and the patient
                column, as a grouping key).

        Returns:
            `transform(df)`, computed once.

        Raises:
            DataError: no rows; a feature column is missing; a numeric column holds text or
                infinite values, or has no value at all; a categorical column has no value at
                all or more than MAX_CATEGORIES distinct values.
        """
        if len(df) == 0:
            raise DataError("fit: the frame has no rows")
        allowed = set(spec.feature_columns)
        categorical = [c for c in spec.categorical if c in allowed]
        numeric = [c for c in spec.numeric if c in allowed]
        engineered: list[str] = []
        engineered_categorical: list[dict] = []
        if spec.builtin == "isic2024":
            engineered = [name for name, inputs, _ in _ENGINEERED if set(inputs) <= set(numeric)]
            name, inputs = _COMBINED_SITE
            if set(inputs) <= set(categorical):
                engineered_categorical.append({"name": name, "inputs": list(inputs)})
        base = {
            "format": ENCODER_FORMAT,
            "dataset": spec.name,
            "id": spec.id,
            "patient": spec.patient,
            "numeric": numeric,
            "categorical": categorical,
            "engineered": engineered,
            "engineered_categorical": engineered_categorical,
        }
        self.state = dict(base, categories={}, columns=[], mlp={})
        _require_columns(df, self._source_columns(), "fit")

        ids = self._ids(df)
        for column in numeric:
            values = _numeric(df[column], column, ids)
            if np.isnan(values).all():
                raise DataError(
                    f"numeric column '{column}' has no value in the {len(df)} rows given "
                    f"(e.g. {df[column].iloc[0]!r}); exclude it in the spec"
                )
        categories: dict[str, list[str]] = {}
        for column, values in self._categorical_values(df).items():
            present = values.dropna()
            if present.empty:
                raise DataError(
                    f"categorical column '{column}' has no value in the {len(df)} rows given "
                    f"(all missing, e.g. {df[column].iloc[0] if column in df else None!r}); "
                    "exclude it in the spec"
                )
            levels = sorted(present.unique().tolist())
            if len(levels) > MAX_CATEGORIES:
                raise DataError(
                    f"categorical column '{column}' has {len(levels)} distinct values "
                    f"(more than {MAX_CATEGORIES}, e.g. {preview(levels[:3])}): an id or free "
                    "text? exclude it or declare it numeric in the spec"
                )
            categories[column] = levels
        self.state["categories"] = categories
        self.state["columns"] = self._layout()

        if not self.state["columns"]:
            raise DataError(
                f"spec '{spec.name}': no feature column (categorical {list(spec.categorical)}, "
                f"numeric {list(spec.numeric)}, minus never-features); nothing to encode"
            )

        # Standardisation for the MLP, from the features of the rows it is fitted on.
        features = self.transform(df, _warn_unknown=False)
        self.state["mlp"] = self._mlp_state(features)
        return features

    def restrict(self, features: pd.DataFrame, rows: np.ndarray) -> tuple[FeatureEncoder, pd.DataFrame, list[int]]:
        """The encoder `fit_transform` would make on a subset of the rows this one was fitted on,
        from this encoder's features of that subset, without recomputing them.

        For the folds of one run: encode every row once, then take each training part's encoder
        and features from that matrix. Categories are those with a row in `features` (in the
        order fit gives them), the MLP standardisation comes from those rows, and the returned
        features are those rows of `features` restricted to the new encoder's columns, renamed as
        it names them (other rows, e.g. a validation part, take the same column positions).
        Values are exactly those of `fit_transform` on the subset provided the per-patient
        features do not depend on the row set: no patient column, or every patient's rows all in
        the subset or all outside it (the caller checks; folds grouped by patient are).

        Args:
            features: this encoder's features (its `fit_transform` output, or `transform` of rows
                it was fitted on), shape (n, len(feature_names)).
            rows: positions in `features` of the subset's rows, shape (n_rows,).

        Returns:
            (encoder, its features of the subset, shape (n_rows, len(encoder.feature_names)),
            positions in `features` of its columns).

        Raises:
            DataError: no rows; `features` lacks this encoder's columns; a numeric column has no
                value or a categorical column only missing values in these rows (as `fit` would).
        """
        state = self._fitted()
        if len(rows) == 0:
            raise DataError("fit: the frame has no rows")
        if list(features.columns) != self.feature_names:
            raise DataError(
                f"restrict: expected the {len(self.feature_names)} columns of this encoder's transform, got "
                f"{len(features.columns)} columns {preview(list(features.columns))}"
            )
        values = features.to_numpy(copy=False)[np.asarray(rows)]
        position = {_column_key(c): i for i, c in enumerate(state["columns"])}
        for c in state["columns"]:
            if c["kind"] == "numeric" and np.isnan(values[:, position[_column_key(c)]]).all():
                raise DataError(
                    f"numeric column '{c['source']}' has no value in the {len(rows)} rows given; "
                    "exclude it in the spec"
                )
        categories: dict[str, list[str]] = {}
        for source, levels in state["categories"].items():
            kept = [level for level in levels
                    if values[:, position[("onehot", source, level)]].any()]
            if not kept:
                raise DataError(
                    f"categorical column '{source}' has no value in the {len(rows)} rows given "
                    "(all missing); exclude it in the spec"
                )
            categories[source] = kept
        encoder = FeatureEncoder()
        encoder.state = dict(_copy({k: v for k, v in state.items() if k not in ("categories", "columns", "mlp")}),
                             categories=categories, columns=[], mlp={})
        encoder.state["columns"] = encoder._layout()
        picks = [position[_column_key(c)] for c in encoder.state["columns"]]
        subset = pd.DataFrame(values[:, picks] if len(picks) < values.shape[1] else values,
                              index=features.index[np.asarray(rows)], columns=encoder.feature_names, copy=False)
        encoder.state["mlp"] = encoder._mlp_state(subset)
        return encoder, subset, picks

    def _mlp_state(self, features: pd.DataFrame) -> dict:
        """Mean and standard deviation of each continuous column of `features` (the fit rows')."""
        continuous = [c["name"] for c in self.state["columns"] if c["kind"] != "onehot"]
        means, stds, indicators = [], [], []
        # One column-major copy: reading column after column of a row-major matrix would touch
        # every cache line of it once per column.
        block = np.asfortranarray(features[continuous].to_numpy())
        for j, name in enumerate(continuous):
            values = block[:, j]
            present = values[~np.isnan(values)]
            mean = float(present.mean(dtype=np.float64)) if len(present) else 0.0
            std = float(present.std(dtype=np.float64)) if len(present) > 1 else 1.0
            means.append(mean if math.isfinite(mean) else 0.0)
            stds.append(std if math.isfinite(std) and std > 0 else 1.0)
            if len(present) < len(values):
                # Indicators only where values were missing at fit: the width stays fixed.
                indicators.append(name)
        return {"columns": continuous, "mean": means, "std": stds, "indicators": indicators}

    # ----------------------------------------------------------------------------- transform
    @property
    def feature_names(self) -> list[str]:
        """Output column names of `transform`, in order."""
        return [c["name"] for c in self._fitted()["columns"]]

    def transform(self, df: pd.DataFrame, _warn_unknown: bool = True) -> pd.DataFrame:
        """Features of the given rows.

        Args:
            df: metadata rows holding at least the columns the encoder was fitted on.

        Returns:
            DataFrame of shape (len(df), len(feature_names)), float32, index of `df`, columns
            `feature_names`. Numeric NaN stays NaN.

        Raises:
            DataError: a needed column is missing; a numeric column holds text or infinite values.
        """
        state = self._fitted()
        _require_columns(df, self._source_columns(), "transform")
        columns = state["columns"]
        out = np.full((len(df), len(columns)), np.nan, dtype=np.float32)
        position = {c["name"]: i for i, c in enumerate(columns)}
        ids = self._ids(df)

        numeric = {c: _numeric(df[c], c, ids) for c in state["numeric"]}
        continuous: dict[str, np.ndarray] = {}
        for column in columns:
            if column["kind"] == "numeric":
                continuous[column["name"]] = numeric[column["source"]]
        with np.errstate(all="ignore"):
            functions = {name: fn for name, _, fn in _ENGINEERED}
            for column in columns:
                if column["kind"] == "engineered":
                    values = np.asarray(functions[column["source"]](numeric), dtype=np.float64)
                    values[~np.isfinite(values)] = np.nan
                    continuous[column["name"]] = values
        for name, values in continuous.items():
            out[:, position[name]] = values

        patient_columns = [c for c in columns if c["kind"] == "patient_norm"]
        if patient_columns:
            self._patient_features(df, continuous, patient_columns, position, out)

        categorical = self._categorical_values(df)
        for source, levels in state["categories"].items():
            values = categorical[source]
            codes = pd.Index(levels, dtype=object).get_indexer(values)
            missing = values.isna().to_numpy()
            unknown = (codes < 0) & ~missing
            names = [c for c in columns if c["kind"] == "onehot" and c["source"] == source]
            block = np.zeros((len(df), len(names)), dtype=np.float32)
            known = np.flatnonzero(codes >= 0)
            block[known, codes[known]] = 1.0
            block[missing, len(levels)] = 1.0  # the last column of the block is `__missing`
            for j, column in enumerate(names):
                out[:, position[column["name"]]] = block[:, j]
            if not _warn_unknown:
                continue
            examples = sorted(set(values[unknown].tolist()))
            if _note_unknown(source, examples, ids.to_numpy()[unknown].tolist()):
                pass  # said once when the collection ends
            elif unknown.any():
                log.warning(
                    "categorical column '%s': %d row(s) hold categories not seen at fit, encoded "
                    "as all-zero: %s",
                    source,
                    int(unknown.sum()),
                    preview(examples),
                )
        return pd.DataFrame(out, index=df.index, columns=self.feature_names, copy=False)

    def mlp_matrix(self, features: pd.DataFrame, standardise: bool = True, indicators: bool = True) -> pd.DataFrame:
        """Features for a neural network: no NaN, continuous columns standardised.

        Args:
            features: the output of `transform` (a raw metadata frame is transformed first).
            standardise: subtract the fit mean, divide by the fit std (continuous columns only;
                one-hot columns pass as they are).
            indicators: add `<column>__isna` (1.0 where the value was missing) for each
                continuous column that had missing values at fit time.

        Returns:
            float32 DataFrame with the same rows: continuous columns (NaN -> 0, i.e. the fit mean
            when standardised), then one-hot columns, then the indicators.
        """
        state = self._fitted()
        if not set(self.feature_names) <= set(features.columns):
            features = self.transform(features)
        mlp = state["mlp"]
        block = features[mlp["columns"]].to_numpy(dtype=np.float32, copy=True)
        isna = np.isnan(block)
        if standardise:
            block -= np.asarray(mlp["mean"], dtype=np.float32)
            block /= np.asarray(mlp["std"], dtype=np.float32)
        block[isna] = 0.0
        parts = [pd.DataFrame(block, index=features.index, columns=mlp["columns"])]
        onehot = [c["name"] for c in state["columns"] if c["kind"] == "onehot"]
        parts.append(features[onehot].astype(np.float32))
        if indicators and mlp["indicators"]:
            where = [mlp["columns"].index(c) for c in mlp["indicators"]]
            parts.append(
                pd.DataFrame(
                    isna[:, where].astype(np.float32),
                    index=features.index,
                    columns=[f"{c}__isna" for c in mlp["indicators"]],
                )
            )
        return pd.concat(parts, axis=1)

    # Name used in the project's interface notes.
    numeric_matrix = mlp_matrix

    # ---------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        """The fitted encoder as a JSON-serialisable dict."""
        return _copy(self._fitted())

    @classmethod
    def from_json(cls, data: dict) -> FeatureEncoder:
        """Rebuild an encoder from `to_json()`.

        Raises:
            DataError: not an encoder document, or another format version.
        """
        if not isinstance(data, dict) or "columns" not in data or "categories" not in data:
            raise DataError("encoder: not a FeatureEncoder JSON document (no 'columns'/'categories')")
        if data.get("format") != ENCODER_FORMAT:
            raise DataError(f"encoder: format {data.get('format')!r} is not supported (expected {ENCODER_FORMAT})")
        encoder = cls()
        encoder.state = _copy(data)
        return encoder

    @property
    def source_columns(self) -> list[str]:
        """Metadata columns the encoder reads (features, plus the patient column as a key)."""
        return self._source_columns()

    # ------------------------------------------------------------------------------- private
    def _fitted(self) -> dict:
        if self.state is None or not self.state.get("columns"):
            raise DataError("encoder: not fitted; call fit(df, spec) or from_json(...) first")
        return self.state

    def _source_columns(self) -> list[str]:
        state = self.state
        columns = [*state["numeric"], *state["categorical"]]
        if state["patient"]:
            columns.append(state["patient"])
        return columns

    def _ids(self, df: pd.DataFrame) -> pd.Series:
        column = self.state["id"]
        if column in df.columns:
            return df[column].astype(str)
        return pd.Series([f"row {i}" for i in range(len(df))], index=df.index)

    def _categorical_values(self, df: pd.DataFrame) -> dict[str, pd.Series]:
        """Each categorical source as object strings (NaN kept), engineered ones included."""
        values = {c: _as_text(df[c]) for c in self.state["categorical"]}
        for combined in self.state["engineered_categorical"]:
            a, b = (values[c] for c in combined["inputs"])
            joined = a.str.cat(b, sep="_")
            values[combined["name"]] = joined.where(a.notna() & b.notna(), np.nan).astype(object)
        return values

    def _layout(self) -> list[dict]:
        state = self.state
        columns: list[dict] = []
        for column in state["numeric"]:
            columns.append({"name": _safe(column), "kind": "numeric", "source": column})
        for name in state["engineered"]:
            columns.append({"name": _safe(name), "kind": "engineered", "source": name})
        for column, name in zip(columns, _unique([c["name"] for c in columns]), strict=True):
            column["name"] = name
        if state["patient"]:
            for column in list(columns):
                columns.append(
                    {"name": f"{column['name']}_patient_norm", "kind": "patient_norm", "source": column["name"]}
                )
            columns.append({"name": "lesions_per_patient", "kind": "patient_count", "source": state["patient"]})
        for source, levels in state["categories"].items():
            for level in levels:
                columns.append(
                    {"name": f"{_safe(source)}__{_safe(level)}", "kind": "onehot", "source": source, "value": level}
                )
            columns.append({"name": f"{_safe(source)}__missing", "kind": "onehot", "source": source, "value": None})
        # Earlier names are kept, so the patient columns' sources above stay valid.
        for column, name in zip(columns, _unique([c["name"] for c in columns]), strict=True):
            column["name"] = name
        return columns

    def _patient_features(
        self,
        df: pd.DataFrame,
        continuous: dict[str, np.ndarray],
        patient_columns: list[dict],
        position: dict[str, int],
        out: np.ndarray,
    ) -> None:
        """Per-patient normalised copies and lesion counts, from these rows only, vectorised."""
        patient = _as_text(df[self.state["patient"]])
        # A row without a patient is its own patient: it must not be pooled with other such rows.
        lone = patient.isna().to_numpy()
        codes, _ = pd.factorize(patient, use_na_sentinel=True)
        if lone.any():
            codes = codes.copy()
            codes[lone] = codes.max(initial=-1) + 1 + np.arange(int(lone.sum()))
        counts = np.bincount(codes)
        count_name = next(c["name"] for c in self.state["columns"] if c["kind"] == "patient_count")
        out[:, position[count_name]] = counts[codes]
        keys = pd.Series(codes, copy=False)
        for start in range(0, len(patient_columns), _PATIENT_CHUNK):
            chunk = patient_columns[start : start + _PATIENT_CHUNK]
            block = pd.DataFrame({c["source"]: continuous[c["source"]] for c in chunk})
            grouped = block.groupby(keys, sort=False)
            mean = grouped.transform("mean").to_numpy()
            std = grouped.transform("std").to_numpy()
            with np.errstate(all="ignore"):
                normalised = (block.to_numpy() - mean) / (std + PATIENT_EPS)
            for j, column in enumerate(chunk):
                out[:, position[column["name"]]] = normalised[:, j]


def _column_key(column: dict) -> tuple:
    """What a feature column is, independent of its (deduplicated) name."""
    if column["kind"] == "onehot":
        return ("onehot", column["source"], column["value"])
    return (column["kind"], column["source"])


def _copy(data: dict) -> dict:
    return json.loads(json.dumps(data))


def _require_columns(df: pd.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{where}: the frame lacks feature column(s) {preview(missing)}")


def _as_text(values: pd.Series) -> pd.Series:
    """Categories compared as text; missing stays NaN (so 'nan' text is not confused with NaN)."""
    array = values.to_numpy(dtype=object, copy=True)
    present = ~pd.isna(array)
    array[present] = [str(v) for v in array[present]]
    array[~present] = np.nan
    return pd.Series(array, index=values.index, dtype=object)


def _numeric(values: pd.Series, column: str, ids: pd.Series) -> np.ndarray:
    """A numeric column as float64, NaN kept; text or infinity is refused naming the rows."""
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        array = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        parsed = pd.to_numeric(values, errors="coerce")
        bad = (values.notna() & parsed.isna()).to_numpy()
        if bad.any():
            raise DataError(
                f"numeric column '{column}' holds text, e.g. {values[bad].iloc[0]!r} "
                f"(ids {preview(ids[bad].tolist())})"
            )
        array = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(array)
    if infinite.any():
        raise DataError(
            f"numeric column '{column}' holds infinite values, e.g. {float(array[infinite][0])} "
            f"(ids {preview(ids[infinite].tolist())})"
        )
    return array
