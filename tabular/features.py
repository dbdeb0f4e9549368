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
   and border measurements of the 3D total-body-photography lesion segmentation;
   `tabular.features_engineered`);
3. only when `spec.patient` is set: each numeric and engineered feature normalised within its
   patient, `(x - patient mean) / (patient std + eps)`, and the number of the patient's lesions in
   the rows given. A malignant lesion tends to look unlike the patient's other lesions (the
   "ugly duckling" sign); these figures come from the rows given to `transform` only, so at
   scoring time they come from the scored rows of that patient (`tabular.features_patient`);
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
from collections.abc import Iterator

import numpy as np
import pandas as pd

from tabular.errors import DataError, preview
from tabular.features_engineered import COMBINED_SITE, engineered_for, engineered_values
from tabular.features_patient import patient_features
from tabular.features_values import as_text, numeric_values
from tabular.spec import DatasetSpec

__all__ = ["MAX_CATEGORIES", "FeatureEncoder", "unknown_categories_said_once"]

log = logging.getLogger(__name__)

# Categories not seen at fit, per column, while `unknown_categories_said_once` is open: every fold
# model has its own encoder and scoring runs in batches, so a warning per `transform` call said
# the same thing 5-10 times. A context variable, not a module global, so that threads and nested
# calls each see their own collection.
_UNKNOWN: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "unknown_categories", default=None
)


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
        collected = _UNKNOWN.get() or {}
        _UNKNOWN.reset(token)
        for column, seen in collected.items():
            if not seen["ids"]:
                continue
            log.warning(
                "categorical column '%s': %d row(s) hold categories not seen at fit (by %d of %d "
                "encoder "
                "calls, e.g. one per fold model), encoded as all-zero: %s",
                column,
                len(seen["ids"]),
                seen["calls_unknown"],
                seen["calls"],
                preview(sorted(seen["values"])),
            )


def _note_unknown(column: str, values: list, ids: list[str]) -> bool:
    """Count one transform of `column` (and the ids and values it did not know) in the open
    collection; False when none is open and the caller logs itself."""
    collected = _UNKNOWN.get()
    if collected is None:
        return False
    seen = collected.setdefault(
        column, {"ids": set(), "calls": 0, "calls_unknown": 0, "values": set()}
    )
    seen["calls"] += 1
    if ids:
        seen["calls_unknown"] += 1
        seen["ids"].update(ids)
        seen["values"].update(values)
    return True


_ENCODER_FORMAT = 1
# A categorical column with more distinct values than this is almost surely an id or free text.
MAX_CATEGORIES = 1000


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
            engineered = engineered_for(numeric)
            name, inputs = COMBINED_SITE
            if set(inputs) <= set(categorical):
                engineered_categorical.append({"name": name, "inputs": list(inputs)})
        base = {
            "format": _ENCODER_FORMAT,
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
            values = numeric_values(df[column], column, ids)
            if np.isnan(values).all():
                raise DataError(
                    f"numeric column '{column}' has no value in the {len(df)} rows given "
                    f"(e.g. {df[column].iloc[0]!r}); exclude it in the spec"
                )
        categories: dict[str, list[str]] = {}
        categorical_values = self._categorical_values(df)
        for column, values in categorical_values.items():
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
        features = self.transform(df, _warn_unknown=False, _categorical=categorical_values)
        self.state["mlp"] = self._mlp_state(features)
        return features

    def restrict(
        self, features: pd.DataFrame, rows: np.ndarray
    ) -> tuple[FeatureEncoder, pd.DataFrame, list[int]]:
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
                f"restrict: expected the {len(self.feature_names)} columns of this encoder's "
                "transform, got "
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
            kept = [
                level for level in levels if values[:, position[("onehot", source, level)]].any()
            ]
            if not kept:
                raise DataError(
                    f"categorical column '{source}' has no value in the {len(rows)} rows given "
                    "(all missing); exclude it in the spec"
                )
            categories[source] = kept
        encoder = FeatureEncoder()
        encoder.state = dict(
            _copy({k: v for k, v in state.items() if k not in ("categories", "columns", "mlp")}),
            categories=categories,
            columns=[],
            mlp={},
        )
        encoder.state["columns"] = encoder._layout()
        picks = [position[_column_key(c)] for c in encoder.state["columns"]]
        subset = pd.DataFrame(
            values[:, picks] if len(picks) < values.shape[1] else values,
            index=features.index[np.asarray(rows)],
            columns=encoder.feature_names,
            copy=False,
        )
        encoder.state["mlp"] = encoder._mlp_state(subset)
        return encoder, subset, picks

    def _mlp_state(self, features: pd.DataFrame) -> dict:
        """Mean and standard deviation of each continuous column of `features` (the fit rows')."""
        continuous = [c["name"] for c in self._state["columns"] if c["kind"] != "onehot"]
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

    def transform(
        self,
        df: pd.DataFrame,
        _warn_unknown: bool = True,
        _categorical: dict[str, pd.Series] | None = None,
    ) -> pd.DataFrame:
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

        numeric = {c: numeric_values(df[c], c, ids) for c in state["numeric"]}
        continuous: dict[str, np.ndarray] = {}
        for column in columns:
            if column["kind"] == "numeric":
                continuous[column["name"]] = numeric[column["source"]]
        for column in columns:
            if column["kind"] == "engineered":
                continuous[column["name"]] = engineered_values(column["source"], numeric)
        for name, values in continuous.items():
            out[:, position[name]] = values

        patient_columns = [c for c in columns if c["kind"] == "patient_norm"]
        if patient_columns:
            count = next(c["name"] for c in columns if c["kind"] == "patient_count")
            patient_features(
                as_text(df[state["patient"]]),
                continuous,
                patient_columns,
                position[count],
                position,
                out,
            )

        # `fit_transform` passes the text values it has just made of the same rows.
        categorical = self._categorical_values(df) if _categorical is None else _categorical
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

    def mlp_matrix(
        self, features: pd.DataFrame, standardise: bool = True, indicators: bool = True
    ) -> pd.DataFrame:
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
            raise DataError(
                "encoder: not a FeatureEncoder JSON document (no 'columns'/'categories')"
            )
        if data.get("format") != _ENCODER_FORMAT:
            raise DataError(
                f"encoder: format {data.get('format')!r} is not supported (expected "
                f"{_ENCODER_FORMAT})"
            )
        encoder = cls()
        encoder.state = _copy(data)
        return encoder

    @property
    def patient_column(self) -> str | None:
        """The column per-patient features are computed over (the spec's `patient`), or None."""
        return self._fitted()["patient"]

    @property
    def source_columns(self) -> list[str]:
        """Metadata columns the encoder reads (features, plus the patient column as a key)."""
        return self._source_columns()

    # ------------------------------------------------------------------------------- private
    @property
    def _state(self) -> dict:
        """The state, fitted or being fitted (`_fitted` requires a finished fit)."""
        if self.state is None:
            raise DataError("encoder: not fitted; call fit(df, spec) or from_json(...) first")
        return self.state

    def _fitted(self) -> dict:
        if self.state is None or not self.state.get("columns"):
            raise DataError("encoder: not fitted; call fit(df, spec) or from_json(...) first")
        return self.state

    def _source_columns(self) -> list[str]:
        state = self._state
        columns = [*state["numeric"], *state["categorical"]]
        if state["patient"]:
            columns.append(state["patient"])
        return columns

    def _ids(self, df: pd.DataFrame) -> pd.Series:
        column = self._state["id"]
        if column in df.columns:
            return df[column].astype(str)
        return pd.Series([f"row {i}" for i in range(len(df))], index=df.index)

    def _categorical_values(self, df: pd.DataFrame) -> dict[str, pd.Series]:
        """Each categorical source as object strings (NaN kept), engineered ones included."""
        values = {c: as_text(df[c]) for c in self._state["categorical"]}
        for combined in self._state["engineered_categorical"]:
            a, b = (values[c] for c in combined["inputs"])
            joined = a.str.cat(b, sep="_")
            values[combined["name"]] = joined.where(a.notna() & b.notna(), np.nan).astype(object)
        return values

    def _layout(self) -> list[dict]:
        state = self._state
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
                    {
                        "name": f"{column['name']}_patient_norm",
                        "kind": "patient_norm",
                        "source": column["name"],
                    }
                )
            columns.append(
                {"name": "lesions_per_patient", "kind": "patient_count", "source": state["patient"]}
            )
        for source, levels in state["categories"].items():
            for level in levels:
                columns.append(
                    {
                        "name": f"{_safe(source)}__{_safe(level)}",
                        "kind": "onehot",
                        "source": source,
                        "value": level,
                    }
                )
            columns.append(
                {
                    "name": f"{_safe(source)}__missing",
                    "kind": "onehot",
                    "source": source,
                    "value": None,
                }
            )
        # Earlier names are kept, so the patient columns' sources above stay valid.
        for column, name in zip(columns, _unique([c["name"] for c in columns]), strict=True):
            column["name"] = name
        return columns


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
