"""The dataset spec: which file holds the metadata, which columns mean what.

A spec is a TOML file (see DESIGN.md) or a directory in the ISIC 2024 Kaggle layout, which gets
the built-in ISIC 2024 spec. Paths inside a TOML spec are relative to the file.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tabular.errors import DataError

__all__ = [
    "ISIC2024_NOT_FEATURES",
    "ISIC2024_TRAIN_ONLY",
    "DatasetSpec",
    "isic2024_spec",
    "load_spec",
    "spec_from_identity",
    "spec_to_toml",
]

# Columns of the ISIC 2024 training file that are absent at inference, several of which give the
# answer away (the diagnosis, the histology, the lesion id that only biopsied lesions have).
ISIC2024_TRAIN_ONLY = (
    "target",
    "lesion_id",
    "iddx_full",
    "iddx_1",
    "iddx_2",
    "iddx_3",
    "iddx_4",
    "iddx_5",
    "mel_mitotic_index",
    "mel_thick_mm",
    "tbp_lv_dnn_lesion_confidence",
)
# Present at inference but describe who took the picture and its licence, not the lesion.
ISIC2024_NOT_FEATURES = ("attribution", "copyright_license", "image_type")

_ISIC2024_CATEGORICAL = (
    "sex",
    "anatom_site_general",
    "tbp_tile_type",
    "tbp_lv_location",
    "tbp_lv_location_simple",
)
_ISIC2024_NUMERIC = (
    "age_approx",
    "clin_size_long_diam_mm",
    "tbp_lv_A",
    "tbp_lv_Aext",
    "tbp_lv_B",
    "tbp_lv_Bext",
    "tbp_lv_C",
    "tbp_lv_Cext",
    "tbp_lv_H",
    "tbp_lv_Hext",
    "tbp_lv_L",
    "tbp_lv_Lext",
    "tbp_lv_areaMM2",
    "tbp_lv_area_perim_ratio",
    "tbp_lv_color_std_mean",
    "tbp_lv_deltaA",
    "tbp_lv_deltaB",
    "tbp_lv_deltaL",
    "tbp_lv_deltaLB",
    "tbp_lv_deltaLBnorm",
    "tbp_lv_eccentricity",
    "tbp_lv_minorAxisMM",
    "tbp_lv_nevi_confidence",
    "tbp_lv_norm_border",
    "tbp_lv_norm_color",
    "tbp_lv_perimeterMM",
    "tbp_lv_radial_color_std_max",
    "tbp_lv_stdL",
    "tbp_lv_stdLExt",
    "tbp_lv_symm_2axis",
    "tbp_lv_symm_2axis_angle",
    "tbp_lv_x",
    "tbp_lv_y",
    "tbp_lv_z",
)

_KNOWN_KEYS = {
    "name",
    "metadata",
    "images",
    "id",
    "target",
    "group",
    "patient",
    "categorical",
    "numeric",
    "exclude",
}
_REQUIRED_KEYS = ("name", "metadata", "id", "group")

# A spec's name becomes a folder name (its feature store, its study): a plain file name only, so
# that "../../x" cannot leave the artifacts folder and "<i>x</i>" cannot nest folders.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_NAME_RULE = (
    "1 to 100 characters: letters A-Z a-z, digits 0-9, '.', '_' and '-', "
    "beginning with a letter or digit"
)


def _check_name(name, where: str = "spec") -> str:
    """`name` when it is a plain file name (see _NAME_RULE).

    Raises:
        DataError: names `where`, the value and the characters allowed.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise DataError(
            f"{where}: key 'name' must be a plain file name ({_NAME_RULE}), got {name!r}; "
            "it names the feature store and the study, so e.g. 'ham10000-dev'"
        )
    return name


@dataclass(frozen=True)
class DatasetSpec:
    """What a data set's files and columns are.

    `group` keeps rows together in one fold (a patient, or a lesion photographed several times);
    `patient`, when set, enables per-patient features. `builtin` is "isic2024" for the built-in
    ISIC 2024 spec, which also enables the engineered `tbp_lv_*` features.
    """

    name: str
    root: Path
    metadata: Path
    images: Path | None
    id: str
    target: str | None
    group: str
    patient: str | None = None
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    builtin: str | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, f"spec {self.source or self.root}")

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """Metadata columns a model may see (categorical then numeric, minus excluded)."""
        return tuple(c for c in (*self.categorical, *self.numeric) if c not in self.never_features)

    @property
    def never_features(self) -> frozenset[str]:
        """Columns no model may ever see: the id, target, group, excluded and train-only ones."""
        banned = {self.id, self.group, *self.exclude}
        if self.target:
            banned.add(self.target)
        if self.builtin == "isic2024":
            banned.update(ISIC2024_TRAIN_ONLY, ISIC2024_NOT_FEATURES)
        if self.patient:
            banned.add(self.patient)
        return frozenset(banned)

    def identity(self) -> dict:
        """The fields a run records to notice later that its spec changed."""
        return {
            "name": self.name,
            "metadata": str(self.metadata),
            "images": str(self.images) if self.images else None,
            "id": self.id,
            "target": self.target,
            "group": self.group,
            "patient": self.patient,
            "categorical": list(self.categorical),
            "numeric": list(self.numeric),
            "exclude": list(self.exclude),
            "builtin": self.builtin,
        }


def load_spec(path: Path | str) -> DatasetSpec:
    """Read a spec TOML file, or build the ISIC 2024 spec for a Kaggle-layout directory.

    Raises:
        DataError: the path does not exist, the TOML is malformed, a required key is missing,
            a key is unknown, a value has the wrong type, or the name is not a plain file name
            (`_NAME_RULE`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"spec: no such file or directory: {path}")
    if path.is_dir():
        return isic2024_spec(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise DataError(f"spec {path}: not valid TOML: {error}") from error
    unknown_sections = sorted(set(document) - {"dataset"})
    if unknown_sections:
        raise DataError(f"spec {path}: unknown section(s) {unknown_sections}; expected [dataset]")
    if "dataset" not in document:
        raise DataError(f"spec {path}: missing the [dataset] section")
    table = document["dataset"]
    unknown = sorted(set(table) - _KNOWN_KEYS)
    if unknown:
        raise DataError(
            f"spec {path}: unknown key(s) {unknown} in [dataset]; known keys: {sorted(_KNOWN_KEYS)}"
        )
    for key in _REQUIRED_KEYS:
        if key not in table:
            raise DataError(f"spec {path}: missing required key '{key}' in [dataset]")
    for key in ("name", "metadata", "images", "id", "target", "group", "patient"):
        if key in table and not isinstance(table[key], str):
            raise DataError(f"spec {path}: key '{key}' must be a string, got {table[key]!r}")
    _check_name(table["name"], f"spec {path}")
    for key in ("categorical", "numeric", "exclude"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"spec {path}: key '{key}' must be a list of strings, got {value!r}")
    root = path.resolve().parent
    images = table.get("images")
    return DatasetSpec(
        name=table["name"],
        root=root,
        metadata=(root / table["metadata"]).resolve(),
        images=(root / images).resolve() if images else None,
        id=table["id"],
        target=table.get("target"),
        group=table["group"],
        patient=table.get("patient"),
        categorical=tuple(table.get("categorical", [])),
        numeric=tuple(table.get("numeric", [])),
        exclude=tuple(table.get("exclude", [])),
        source=path.resolve(),
    )


def isic2024_spec(directory: Path | str, name: str | None = None) -> DatasetSpec:
    """The built-in spec for a directory in the ISIC 2024 Kaggle layout.

    Takes `train-metadata.csv` + `train-image.hdf5` when present, else the `test-*` pair (which has
    no target: fit for scoring only).

    Raises:
        DataError: the directory holds neither pair.
    """
    directory = Path(directory).resolve()
    for part, target in (("train", "target"), ("test", None)):
        metadata = directory / f"{part}-metadata.csv"
        if metadata.exists():
            images = directory / f"{part}-image.hdf5"
            return DatasetSpec(
                # A folder name may hold what a spec name may not (spaces): those become '-'.
                name=name
                or re.sub(r"[^A-Za-z0-9._-]", "-", f"{directory.name}-{part}").lstrip("._-"),
                root=directory,
                metadata=metadata,
                images=images if images.exists() else None,
                id="isic_id",
                target=target,
                group="patient_id",
                patient="patient_id",
                categorical=_ISIC2024_CATEGORICAL,
                numeric=_ISIC2024_NUMERIC,
                exclude=(),
                builtin="isic2024",
                source=directory,
            )
    raise DataError(
        f"spec: directory {directory} is not in the ISIC 2024 Kaggle layout: expected "
        "train-metadata.csv (+ train-image.hdf5) or test-metadata.csv (+ test-image.hdf5)"
    )


def spec_to_toml(spec: DatasetSpec) -> str:
    """The spec as a self-contained TOML document with absolute paths (a run's `spec.toml`)."""

    def quote(value: str) -> str:
        # A JSON string of printable text is a valid TOML basic string.
        return json.dumps(value, ensure_ascii=False)

    def strings(values: tuple[str, ...]) -> str:
        return "[" + ", ".join(quote(v) for v in values) + "]"

    lines = ["[dataset]", f"name = {quote(spec.name)}", f"metadata = {quote(str(spec.metadata))}"]
    if spec.images:
        lines.append(f"images = {quote(str(spec.images))}")
    lines.append(f"id = {quote(spec.id)}")
    if spec.target:
        lines.append(f"target = {quote(spec.target)}")
    lines.append(f"group = {quote(spec.group)}")
    if spec.patient:
        lines.append(f"patient = {quote(spec.patient)}")
    lines += [
        f"categorical = {strings(spec.categorical)}",
        f"numeric = {strings(spec.numeric)}",
        f"exclude = {strings(spec.exclude)}",
    ]
    header = (
        f"# Copy of the spec this run was made with (built-in: {spec.builtin})\n"
        if spec.builtin
        else ""
    )
    return header + "\n".join(lines) + "\n"


def spec_from_identity(identity: dict) -> DatasetSpec:
    """Rebuild a spec from `DatasetSpec.identity()` (as a run records it in `run.json`)."""
    metadata = Path(identity["metadata"])
    return DatasetSpec(
        name=identity["name"],
        root=metadata.parent,
        metadata=metadata,
        images=Path(identity["images"]) if identity.get("images") else None,
        id=identity["id"],
        target=identity.get("target"),
        group=identity["group"],
        patient=identity.get("patient"),
        categorical=tuple(identity.get("categorical", ())),
        numeric=tuple(identity.get("numeric", ())),
        exclude=tuple(identity.get("exclude", ())),
        builtin=identity.get("builtin"),
    )
