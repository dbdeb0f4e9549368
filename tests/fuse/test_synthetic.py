"""fuse.demo.synthetic: the ISIC 2024-like generator's layout, formats, determinism and signal."""

from __future__ import annotations

import io
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fuse.demo.lesion_images import draw_lesion
from fuse.demo.synthetic import TEST_COLUMNS, TRAIN_COLUMNS, make_isic2024_like
from fuse.errors import RunError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
REAL_TRAIN = SHARED / "isic2024-mini" / "train-metadata.csv"
REAL_TRAIN_H5 = SHARED / "isic2024-mini" / "train-image.hdf5"
REAL_TEST = SHARED / "isic2024-demo" / "test-metadata.csv"

SIGNAL_COLUMNS = [
    "clin_size_long_diam_mm",
    "tbp_lv_norm_color",
    "tbp_lv_norm_border",
    "tbp_lv_nevi_confidence",
    "tbp_lv_deltaA",
]


def real(path: Path) -> Path:
    if not path.exists():
        pytest.skip("../shared/data is absent")
    return path


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """3,000 rows of 60 patients at 5% prevalence, metadata only."""
    out = tmp_path_factory.mktemp("table")
    summary = make_isic2024_like(out, 3000, 60, 0.05, seed=3, write_images=False)
    return summary, pd.read_csv(summary.train_metadata)


@pytest.fixture(scope="module")
def with_images(tmp_path_factory):
    """240 training rows and 40 test-format rows, with images 64..96 px."""
    out = tmp_path_factory.mktemp("images")
    return make_isic2024_like(out, 240, 12, 0.1, seed=1, image_size_range=(64, 96), test_rows=40)


def test_train_columns_are_the_real_files_in_order(table):
    summary, frame = table
    header = pd.read_csv(real(REAL_TRAIN), nrows=0).columns.tolist()
    assert list(TRAIN_COLUMNS) == header
    assert frame.columns.tolist() == header
    assert len(header) == 55


def test_test_pair_has_exactly_the_demo_columns(with_images):
    header = pd.read_csv(real(REAL_TEST), nrows=0).columns.tolist()
    frame = pd.read_csv(with_images.test_metadata)
    assert list(TEST_COLUMNS) == header
    assert frame.columns.tolist() == header
    assert len(header) == 44
    assert "target" not in frame.columns
    truth = pd.read_csv(with_images.test_truth)
    assert truth.columns.tolist() == ["isic_id", "target"]
    assert truth["isic_id"].tolist() == frame["isic_id"].tolist()


def _kinds(frame: pd.DataFrame) -> dict[str, str]:
    def kind(series):
        if pd.api.types.is_integer_dtype(series):
            return "int"
        if pd.api.types.is_float_dtype(series):
            return "float"
        return "text"

    return {c: kind(frame[c]) for c in frame.columns}


def test_columns_parse_with_the_real_files_dtypes(table, with_images):
    _, frame = table
    assert _kinds(frame) == _kinds(pd.read_csv(real(REAL_TRAIN)))
    test = pd.read_csv(with_images.test_metadata)
    assert _kinds(test) == _kinds(pd.read_csv(real(REAL_TEST)))


def test_values_have_the_real_formats_and_categories(table):
    _, frame = table
    real_frame = pd.read_csv(real(REAL_TRAIN))
    for column in ("sex", "anatom_site_general", "image_type", "tbp_tile_type", "iddx_1"):
        ours = set(frame[column].dropna())
        assert ours <= set(real_frame[column].dropna()) | {"Indeterminate"}, column
    assert set(frame["copyright_license"]) <= {"CC-BY", "CC-BY-NC", "CC-0"}
    # One licence per imaging site, as in the real file.
    assert frame.groupby("attribution")["copyright_license"].nunique().max() == 1
    ages = frame["age_approx"].dropna()
    assert (ages % 5 == 0).all() and ages.between(0, 90).all()
    assert frame["sex"].isna().any() or frame["sex"].nunique() == 2
    assert (frame["tbp_lv_symm_2axis_angle"] % 5 == 0).all()
    assert frame["tbp_lv_symm_2axis_angle"].between(0, 175).all()
    for column in ("tbp_lv_nevi_confidence", "tbp_lv_dnn_lesion_confidence"):
        assert frame[column].between(0, 100).all()
    for column in ("tbp_lv_norm_border", "tbp_lv_norm_color"):
        assert frame[column].between(0, 10).all()
    assert frame["clin_size_long_diam_mm"].between(1.0, 40.0).all()
    assert frame["tbp_lv_eccentricity"].between(0, 1).all()
    # The real set's identities between columns.
    f = frame
    np.testing.assert_allclose(f["tbp_lv_C"], np.hypot(f["tbp_lv_A"], f["tbp_lv_B"]), atol=1e-5)
    np.testing.assert_allclose(
        f["tbp_lv_H"], np.degrees(np.arctan2(f["tbp_lv_B"], f["tbp_lv_A"])), atol=1e-5
    )
    np.testing.assert_allclose(f["tbp_lv_deltaA"], f["tbp_lv_A"] - f["tbp_lv_Aext"], atol=1e-5)
    np.testing.assert_allclose(f["tbp_lv_deltaL"], f["tbp_lv_L"] - f["tbp_lv_Lext"], atol=1e-5)
    np.testing.assert_allclose(
        f["tbp_lv_area_perim_ratio"], f["tbp_lv_perimeterMM"] ** 2 / f["tbp_lv_areaMM2"], rtol=1e-4
    )
    assert (f["tbp_lv_area_perim_ratio"] >= 4 * math.pi - 1e-3).all()
    assert (f["tbp_lv_minorAxisMM"] <= f["clin_size_long_diam_mm"] * 1.2).all()
    location_to_site = f.groupby("tbp_lv_location")["anatom_site_general"].unique()
    assert all(len(sites) == 1 for sites in location_to_site)


def test_train_only_columns_agree_with_the_target(table):
    _, f = table
    malignant = f["target"] == 1
    assert (f.loc[malignant, "iddx_1"] == "Malignant").all()
    assert f.loc[malignant, "iddx_full"].str.startswith("Malignant::").all()
    assert (f.loc[~malignant, "iddx_1"] != "Malignant").all()
    assert f.loc[malignant, "lesion_id"].notna().all()
    assert f["lesion_id"].isna().mean() > 0.8  # mostly empty, as in the real set
    assert f.loc[~malignant, ["mel_thick_mm", "mel_mitotic_index"]].isna().all().all()
    invasive = f["iddx_full"].str.contains("Melanoma Invasive")
    assert f.loc[invasive, "mel_thick_mm"].notna().all()
    assert f["iddx_5"].isna().all()


def test_ids_are_unique_and_formatted(table, with_images):
    _, f = table
    assert f["isic_id"].is_unique
    assert f["isic_id"].str.fullmatch(r"ISIC_\d{7}").all()
    assert f["patient_id"].str.fullmatch(r"IP_\d{7}").all()
    assert f["lesion_id"].dropna().str.fullmatch(r"IL_\d{7}").all()
    assert f["lesion_id"].dropna().is_unique
    assert f["isic_id"].is_monotonic_increasing  # the real file is sorted by id
    train = pd.read_csv(with_images.train_metadata)
    test = pd.read_csv(with_images.test_metadata)
    assert not set(train["isic_id"]) & set(test["isic_id"])
    assert not set(train["patient_id"]) & set(test["patient_id"])


@pytest.mark.parametrize(("n_rows", "prevalence"), [(2000, 0.001), (2000, 0.05), (500, 0.3)])
def test_prevalence_is_as_requested(tmp_path, n_rows, prevalence):
    summary = make_isic2024_like(tmp_path, n_rows, 20, prevalence, write_images=False)
    target = pd.read_csv(summary.train_metadata)["target"]
    assert set(target) == {0, 1}
    assert abs(target.mean() - prevalence) <= 1.0 / n_rows
    assert summary.n_positive == target.sum()


def test_patients_have_many_lesions_heavy_tailed(table):
    _, f = table
    per_patient = f.groupby("patient_id").size()
    assert len(per_patient) == 60
    assert per_patient.min() >= 1
    assert per_patient.median() >= 10
    assert per_patient.max() >= 2.5 * per_patient.median()
    # Patient-level covariates are constant within a patient.
    for column in ("age_approx", "sex", "attribution", "tbp_tile_type"):
        assert (f.groupby("patient_id")[column].nunique(dropna=False) == 1).all(), column


def test_hdf5_holds_one_decodable_jpeg_per_id_stored_like_the_real_file(with_images):
    with h5py.File(real(REAL_TRAIN_H5), "r") as h5:
        real_item = h5[next(iter(h5.keys()))]
        real_kind, real_shape = real_item.dtype.kind, real_item.shape
    for metadata, images in (
        (with_images.train_metadata, with_images.train_images),
        (with_images.test_metadata, with_images.test_images),
    ):
        ids = pd.read_csv(metadata)["isic_id"].tolist()
        with h5py.File(images, "r") as h5:
            assert sorted(h5.keys()) == sorted(ids)
            for image_id in ids:
                item = h5[image_id]
                assert (item.dtype.kind, item.shape) == (real_kind, real_shape)
                image = Image.open(io.BytesIO(item[()]))
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                width, height = image.size
                assert width == height and 64 <= width <= 96
                image.load()


def test_images_agree_with_the_metadata(with_images):
    """Lesions darker than their skin in the table (deltaL) are darker in the picture."""
    frame = pd.read_csv(with_images.train_metadata)
    contrast = []
    with h5py.File(with_images.train_images, "r") as h5:
        for image_id in frame["isic_id"]:
            pixels = np.asarray(Image.open(io.BytesIO(h5[image_id][()])).convert("L"), float)
            n = pixels.shape[0]
            centre = pixels[n // 2 - 2 : n // 2 + 3, n // 2 - 2 : n // 2 + 3].mean()
            border = np.concatenate([pixels[:4].ravel(), pixels[-4:].ravel()]).mean()
            contrast.append(centre - border)
    assert np.corrcoef(frame["tbp_lv_deltaL"], contrast)[0, 1] > 0.5


LESION_ROW = {
    "clin_size_long_diam_mm": 3.0,
    "tbp_lv_minorAxisMM": 2.4,
    "tbp_lv_symm_2axis": 0.25,
    "tbp_lv_symm_2axis_angle": 45,
    "tbp_lv_area_perim_ratio": 14.0,
    "tbp_lv_L": 35.0,
    "tbp_lv_A": 20.0,
    "tbp_lv_B": 25.0,
    "tbp_lv_Lext": 60.0,
    "tbp_lv_Aext": 15.0,
    "tbp_lv_Bext": 24.0,
    "tbp_lv_stdL": 2.0,
    "tbp_lv_stdLExt": 2.0,
    "tbp_lv_color_std_mean": 0.5,
    "tbp_lv_radial_color_std_max": 0.5,
}


def _lesion_pixels(change: dict) -> np.ndarray:
    """Lightness of the pixels clearly darker than the skin, for LESION_ROW with `change`."""
    row = {**LESION_ROW, **change}
    pixels = draw_lesion(row, 128, np.random.default_rng(0)).astype(float).mean(axis=-1)
    skin = np.median(np.concatenate([pixels[:6].ravel(), pixels[-6:].ravel()]))
    return pixels[pixels < skin - 25]


def test_drawn_lesion_follows_its_row():
    small = _lesion_pixels({})
    large = _lesion_pixels({"clin_size_long_diam_mm": 6.0, "tbp_lv_minorAxisMM": 4.8})
    assert 2.5 < large.size / small.size < 6  # area grows with the square of the diameter
    darker = _lesion_pixels({"tbp_lv_L": 25.0})
    assert darker.mean() < small.mean() - 10
    plain = _lesion_pixels({"clin_size_long_diam_mm": 6.0, "tbp_lv_minorAxisMM": 4.8})
    varied = _lesion_pixels(
        {"clin_size_long_diam_mm": 6.0, "tbp_lv_minorAxisMM": 4.8, "tbp_lv_stdL": 6.0}
    )
    assert varied.std() > 1.5 * plain.std()
    pixels = draw_lesion(LESION_ROW, 77, np.random.default_rng(1))
    assert pixels.shape == (77, 77, 3) and pixels.dtype == np.uint8


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    args = dict(n_rows=60, n_patients=5, prevalence=0.1, image_size_range=(48, 64), test_rows=10)
    first = make_isic2024_like(tmp_path / "a", seed=7, **args)
    second = make_isic2024_like(tmp_path / "b", seed=7, **args)
    other = make_isic2024_like(tmp_path / "c", seed=8, write_images=False, **args)
    for name in ("train-metadata.csv", "test-metadata.csv", "test-truth.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first.train_metadata.read_bytes() != other.train_metadata.read_bytes()
    for path in ("train-image.hdf5", "test-image.hdf5"):
        with h5py.File(tmp_path / "a" / path) as h1, h5py.File(tmp_path / "b" / path) as h2:
            assert list(h1.keys()) == list(h2.keys())
            for key in h1:
                assert h1[key][()] == h2[key][()]
    assert second.images_per_s is not None and other.images_per_s is None


def test_training_rows_do_not_depend_on_the_test_pair_or_images(tmp_path):
    args = dict(n_rows=80, n_patients=6, prevalence=0.1, seed=4)
    alone = make_isic2024_like(tmp_path / "a", write_images=False, **args)
    paired = make_isic2024_like(tmp_path / "b", image_size_range=(32, 40), test_rows=30, **args)
    assert alone.train_metadata.read_bytes() == paired.train_metadata.read_bytes()
    assert paired.test_rows == 30 and paired.test_positive == 3


def test_signal_exists_but_is_not_trivial(table):
    """A linear model on five raw columns separates the classes, far from perfectly; the same
    columns normalised within each patient (the "ugly duckling" view) do better."""
    _, f = table
    y = f["target"].to_numpy()
    folds = GroupKFold(n_splits=5)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))

    def auc(x):
        p = cross_val_predict(model, x, y, groups=f["patient_id"], cv=folds, method="predict_proba")
        return roc_auc_score(y, p[:, 1])

    raw = auc(f[SIGNAL_COLUMNS].to_numpy())
    grouped = f.groupby("patient_id")[SIGNAL_COLUMNS]
    z = (f[SIGNAL_COLUMNS] - grouped.transform("mean")) / (grouped.transform("std") + 1e-6)
    per_patient = auc(np.hstack([f[SIGNAL_COLUMNS].to_numpy(), z.fillna(0).to_numpy()]))
    assert 0.7 < raw < 0.98
    assert 0.7 < per_patient < 0.98
    assert per_patient > raw


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prevalence=0.0), r"prevalence in \(0, 1\), got 0\.0"),
        (dict(prevalence=1.0), r"prevalence in \(0, 1\), got 1\.0"),
        (dict(prevalence=-0.2), r"prevalence in \(0, 1\), got -0\.2"),
        (dict(prevalence=float("nan")), r"prevalence in \(0, 1\), got nan"),
        (dict(n_rows=0, n_patients=1), r"n_rows to be an integer >= 1, got 0"),
        (dict(n_rows=5, n_patients=6), r"n_patients <= n_rows .*n_patients=6 with n_rows=5"),
        (dict(n_patients=0), r"n_patients to be an integer >= 1, got 0"),
        (dict(seed=-1), r"seed to be an integer >= 0, got -1"),
        (dict(test_rows=-3), r"test_rows to be an integer >= 0, got -3"),
        (dict(image_size_range=(8, 8)), r"image_size_range .*got \(8, 8\)"),
        (dict(image_size_range=(100, 50)), r"image_size_range .*got \(100, 50\)"),
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path, kwargs, match):
    args = dict(n_rows=10, n_patients=2, prevalence=0.1, write_images=False)
    args.update(kwargs)
    with pytest.raises(RunError, match=match):
        make_isic2024_like(tmp_path, **args)
    assert not (tmp_path / "train-metadata.csv").exists()
