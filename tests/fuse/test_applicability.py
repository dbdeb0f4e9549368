"""The applicability detector: planted unusual rows are marked, ordinary held-out rows about as
often as the stated share, reasons name the part and the column, the saved detector reads back
and refuses embeddings of another store. The real-data check (a HAM10000 detector marks ISIC
2024 crops) is at the end; it needs the HAM10000 feature store and the backbone weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embed.acquisition import CUE_NAMES
from embed.errors import StoreMismatchError
from fuse.applicability.detector import (
    ARRAYS,
    RECORD,
    ApplicabilityConfig,
    fit_applicability,
    load,
)
from fuse.errors import RunError

IDENTITY = {
    "backbone": "resnet50-test",
    "weights_sha256": "a" * 64,
    "preprocessing": {"resize": "test"},
    "image_size": 64,
    "views": 1,
    "blocks": ["layer3"],
    "pooling": "gem",
    "variant": "eager",
    "dtype": "float16",
    "dim": 32,
}
DIM = 32


class World:
    """A synthetic training distribution: embeddings on a low-rank structure plus noise,
    dermoscopy-like cues (one fixed size), age and site metadata; `draw` makes fresh rows."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.basis = self.rng.normal(size=(8, DIM))
        self.offset = self.rng.normal(size=DIM) * 3

    def embeddings(self, n: int, other_kind: np.random.Generator | None = None) -> np.ndarray:
        """Rows of the training kind; with `other_kind`, rows of another kind of image: a
        cluster with its own centre and directions, of the same spread and norm."""
        basis, offset = self.basis, self.offset
        if other_kind is not None:
            basis, offset = other_kind.normal(size=(8, DIM)), other_kind.normal(size=DIM) * 3
        x = offset + self.rng.normal(size=(n, 8)) @ basis + self.rng.normal(size=(n, DIM)) * 0.5
        return x.astype(np.float16)

    def cues(self, n: int, size=(200, 150)) -> pd.DataFrame:
        frame = pd.DataFrame(
            self.rng.normal(size=(n, len(CUE_NAMES))) * 0.1 + 1.0, columns=list(CUE_NAMES)
        )
        frame["width"], frame["height"] = float(size[0]), float(size[1])
        frame["log_pixels"] = np.log(size[0] * size[1])
        frame["log_aspect"] = np.log(size[0] / size[1])
        frame["L_mean"] = 60 + self.rng.normal(size=n) * 7
        return frame

    def metadata(self, n: int) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "age": self.rng.integers(20, 80, size=n).astype(float),
                "site": self.rng.choice(["back", "face", "leg"], size=n),
            }
        )

    def folds(self, n: int, k: int = 5) -> np.ndarray:
        return np.arange(n) % k


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def fitted(world, tmp_path_factory):
    n = 1500
    stage = tmp_path_factory.mktemp("applicability")
    detector = fit_applicability(
        stage,
        world.folds(n),
        embeddings=world.embeddings(n),
        identity=IDENTITY,
        cues=world.cues(n),
        metadata=world.metadata(n),
        numeric=["age"],
        categorical=["site"],
    )
    return stage, detector


def test_out_of_fold_share_is_the_stated_share(fitted):
    _, detector = fitted
    summary = detector.summary()
    assert summary["marked_share"] == 0.025
    assert 0.015 <= summary["marked_share_out_of_fold"] <= 0.025
    assert 0.97 <= summary["threshold"] <= 0.98
    assert set(summary["parts"]) == {"image", "acquisition", "metadata"}


def test_fresh_rows_of_the_training_distribution_are_marked_about_as_often(world, fitted):
    _, detector = fitted
    n = 2000
    out = detector.predict(world.embeddings(n), world.cues(n), world.metadata(n), identity=IDENTITY)
    assert list(out.columns[:3]) == ["novelty", "unlike_training", "reason"]
    assert 0.005 <= out["unlike_training"].mean() <= 0.05
    # novelty is a percentile of the training rows: fresh rows of the same kind spread over 0..1
    assert 0.35 <= out["novelty"].median() <= 0.65
    assert (out.loc[~out["unlike_training"], "reason"] == "").all()


def test_a_planted_cluster_of_unlike_images_is_marked_by_the_image_part(world, fitted):
    _, detector = fitted
    n = 60
    out = detector.predict(
        world.embeddings(n, np.random.default_rng(5)),
        world.cues(n),
        world.metadata(n),
        identity=IDENTITY,
    )
    assert out["unlike_training"].all()
    assert out["reason"].str.startswith("image unlike training (beyond every training row").all()
    # their cues and metadata are ordinary: those parts speak about as often as for any row
    assert out["reason"].str.contains("acquisition|metadata").mean() <= 0.1
    assert (out["novelty_image"] > 0.99).all()


def test_other_acquisition_is_marked_and_the_size_named(world, fitted):
    _, detector = fitted
    n = 40
    out = detector.predict(
        world.embeddings(n), world.cues(n, size=(140, 140)), world.metadata(n), identity=IDENTITY
    )
    assert out["unlike_training"].all()
    assert out["reason"].str.contains("acquisition").all()
    assert out["reason"].str.contains("size 140x140 vs training 200x150").all()


def test_metadata_out_of_range_and_unseen_categories_name_the_column(world, fitted):
    _, detector = fitted
    n = 4
    meta = world.metadata(n)
    meta.loc[0, "age"] = 130.0
    meta.loc[1, "site"] = "sole"
    meta.loc[2, "age"] = 79.0  # inside the range: not marked by metadata
    meta.loc[3, "site"] = "back"
    out = detector.predict(world.embeddings(n), world.cues(n), meta, identity=IDENTITY)
    meta.loc[1, "site"] = None
    missing = detector.predict(world.embeddings(n), world.cues(n), meta, identity=IDENTITY)
    assert "site missing, never missing in training" in missing["reason"].iloc[1]
    assert out["unlike_training"].iloc[0] and out["unlike_training"].iloc[1]
    assert (
        "metadata" in out["reason"].iloc[0]
        and "age = 130.0 outside training" in out["reason"].iloc[0]
    )
    assert "site = 'sole' never seen in training" in out["reason"].iloc[1]
    assert out["novelty_metadata"].iloc[2] < 0.5 and out["novelty_metadata"].iloc[3] < 0.5


def test_saved_detector_reads_back_and_predicts_the_same(world, fitted):
    stage, detector = fitted
    assert json.loads((stage / RECORD).read_text())["format"] == "lesionfuse-applicability/1"
    again = load(stage)
    n = 50
    emb, cues, meta = world.embeddings(n), world.cues(n), world.metadata(n)
    meta.loc[0, "site"] = "sole"
    a = detector.predict(emb, cues, meta, identity=IDENTITY)
    b = again.predict(emb, cues, meta, identity=IDENTITY)
    pd.testing.assert_frame_equal(a, b)
    assert again.summary()["threshold"] == detector.summary()["threshold"]
    with np.load(
        stage / ARRAYS, allow_pickle=False
    ) as data:  # the residual part: mean and 16 directions
        assert data["image_components"].shape == (16, DIM) and data["image_mean"].shape == (DIM,)


@pytest.mark.parametrize("method", ["knn", "pca-residual"])
def test_both_image_methods_mark_the_planted_cluster_and_read_back(world, tmp_path, method):
    from fuse.applicability.detector import ApplicabilityConfig

    n = 800
    detector = fit_applicability(
        tmp_path,
        world.folds(n),
        embeddings=world.embeddings(n),
        identity=IDENTITY,
        config=ApplicabilityConfig(image_method=method),
    )
    assert detector.record["part_states"]["image"].get("method", "knn") == method
    other = world.embeddings(40, np.random.default_rng(7))
    same = world.embeddings(400)
    again = load(tmp_path)
    assert again.predict(other, identity=IDENTITY)["unlike_training"].mean() >= 0.95
    assert again.predict(same, identity=IDENTITY)["unlike_training"].mean() <= 0.06
    pd.testing.assert_frame_equal(
        detector.predict(other, identity=IDENTITY), again.predict(other, identity=IDENTITY)
    )


def test_embeddings_of_another_store_are_refused_naming_the_field(world, fitted):
    _, detector = fitted
    other = {**IDENTITY, "weights_sha256": "b" * 64}
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        detector.predict(world.embeddings(3), world.cues(3), world.metadata(3), identity=other)
    with pytest.raises(StoreMismatchError, match="pooling"):
        detector.check_identity({**IDENTITY, "pooling": "avg", "store": "/x", "count": 3})
    with pytest.raises(RunError, match="identity is required"):
        detector.predict(world.embeddings(3), world.cues(3), world.metadata(3))


def test_tabular_only_run_uses_metadata_alone(world, tmp_path):
    n = 400
    detector = fit_applicability(
        tmp_path, world.folds(n), metadata=world.metadata(n), numeric=["age"], categorical=["site"]
    )
    assert detector.summary()["parts"] == ["metadata"]
    assert detector.identity is None
    meta = world.metadata(3)
    meta.loc[0, "age"] = 200.0
    out = load(tmp_path).predict(metadata=meta)
    assert out["unlike_training"].tolist() == [True, False, False]
    assert out["reason"].iloc[0].startswith("metadata")
    assert out.index.equals(meta.index)
    with pytest.raises(RunError, match=r"fitted without embeddings \(parts \['metadata'\]\)"):
        detector.check_identity(IDENTITY)


def test_rows_that_tie_are_marked_together_or_not_at_all(tmp_path):
    # every training row has the same metadata: no threshold can mark 2.5%, so none is marked
    n = 100
    meta = pd.DataFrame({"site": ["back"] * n})
    detector = fit_applicability(tmp_path, np.arange(n) % 5, metadata=meta, categorical=["site"])
    assert detector.summary()["marked_share_out_of_fold"] == 0.0
    out = detector.predict(metadata=pd.DataFrame({"site": ["back", "face"]}))
    assert out["unlike_training"].tolist() == [False, True]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"folds": np.zeros(20)}, "at least 2 distinct folds"),
        ({"metadata": None}, "nothing to fit on"),
        ({"categorical": ["colour"]}, r"lacks column\(s\) \['colour'\]"),
        ({"embeddings": np.zeros((20, 4))}, "identity is required"),
        ({"embeddings": np.zeros((19, 4)), "identity": IDENTITY}, "embeddings hold 19 rows"),
        ({"embeddings": np.zeros(20), "identity": IDENTITY}, r"shape \(rows, dim\)"),
        ({"cues": pd.DataFrame({"width": np.ones(20)})}, r"cues lack column\(s\)"),
        ({"cues": np.ones((20, 3))}, r"cues must have shape \(rows, 15\)"),
    ],
)
def test_fit_errors_name_the_input(tmp_path, kwargs, message):
    args = {
        "folds": np.arange(20) % 2,
        "metadata": pd.DataFrame({"site": ["a"] * 20}),
        "categorical": ["site"],
        **kwargs,
    }
    with pytest.raises(RunError, match=message):
        fit_applicability(tmp_path, **args)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("marked_share", 0.0, "marked_share: expected a share in"),
        ("marked_share", 0.7, "marked_share: expected a share in"),
        ("neighbours", 0, "neighbours: expected a positive integer, got 0"),
        ("image_method", "lof", "image_method: expected 'pca-residual' or 'knn', got 'lof'"),
        ("image_components", 0, "image_components: expected a positive integer, got 0"),
        ("max_reference", 2.5, "max_reference: expected a positive integer"),
        ("numeric_margin", -1, "numeric_margin: expected a number >= 0"),
    ],
)
def test_config_errors_name_the_setting(field, value, message):
    with pytest.raises(RunError, match=message):
        ApplicabilityConfig(**{field: value})


def test_predict_errors_name_the_missing_input_or_column(world, fitted):
    _, detector = fitted
    emb, cues, meta = world.embeddings(3), world.cues(3), world.metadata(3)
    with pytest.raises(RunError, match="has a image part; pass embeddings"):
        detector.predict(None, cues, meta, identity=IDENTITY)
    with pytest.raises(RunError, match="has a acquisition part; pass cues"):
        detector.predict(emb, None, meta, identity=IDENTITY)
    with pytest.raises(RunError, match=r"metadata lacks column\(s\) \['site'\]"):
        detector.predict(emb, cues, meta.drop(columns="site"), identity=IDENTITY)
    with pytest.raises(RunError, match="embeddings have dim 8, the detector 32"):
        detector.predict(np.zeros((3, 8)), cues, meta, identity=IDENTITY)
    with pytest.raises(RunError, match="cues hold 2 rows but the other inputs 3"):
        detector.predict(emb, cues.iloc[:2], meta, identity=IDENTITY)


def test_load_refuses_missing_altered_or_foreign_files(world, tmp_path):
    with pytest.raises(RunError, match="applicability.json' is missing"):
        load(tmp_path)
    n = 100
    fit_applicability(tmp_path, world.folds(n), metadata=world.metadata(n), numeric=["age"])
    arrays = tmp_path / ARRAYS
    arrays.write_bytes(arrays.read_bytes() + b"x")
    with pytest.raises(RunError, match="does not match the sha256"):
        load(tmp_path)
    (tmp_path / RECORD).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RunError, match="format 'something-else'"):
        load(tmp_path)


# -- the real-data check ------------------------------------------------------------------------

HAM_ROWS_MAX = 4000  # cues of every HAM10000 image take minutes on a loaded 2-core machine


def _store_with_manifest(pattern: str) -> Path | None:
    from runfolder.paths import stores_root

    found = sorted(p for p in stores_root().glob(pattern) if (p / "manifest.json").is_file())
    return found[0] if found else None


def _isic_crops_store(shared: Path, ham_identity: dict, tmp_path: Path) -> Path:
    """The 51 ISIC 2024 crops embedded with the HAM10000 store's weights and settings: an
    existing store under artifacts/stores, else built now (needs the cached weights)."""
    from embed.config import config_for_identity
    from embed.pipeline import build_store
    from embed.sources import open_source
    from embed.store import FeatureStore
    from embed.weights import RECORD_FILENAME, default_cache_dir, ensure_weights

    existing = _store_with_manifest("isic2024-mini-as-ham-*")
    if existing is not None:
        store = FeatureStore.open(existing)
        if all(store.manifest.get(k) == ham_identity.get(k) for k in ("weights_sha256", "dim")):
            return existing
    if not (default_cache_dir() / RECORD_FILENAME).is_file():
        pytest.skip("backbone weights are not cached (artifacts/weights): run `invoke weights`")
    weights = ensure_weights()
    config = config_for_identity(ham_identity, device="cpu", num_workers=0, progress=False)
    target = tmp_path / "isic-crops-store"
    source = open_source(shared / "isic2024-mini" / "train-image.hdf5")
    build_store(source, None, target, "isic2024-mini-as-ham", weights, config)
    return target


@pytest.mark.slow
def test_real_data_ham10000_detector_marks_isic2024_crops_and_few_held_out_lesions(
    shared_data, tmp_path
):
    """A detector fitted on HAM10000 lesions (out of fold of the lesion-grouped folds) marks at
    least 90% of the 51 ISIC 2024 total-body-photography crops and at most 5% of HAM10000
    lesions it was not fitted on (each fold held out in turn; the detector fitted on the other
    folds, with its own out-of-fold threshold inside them)."""
    from embed.acquisition import acquisition_cues
    from embed.sources import open_source
    from embed.store import FeatureStore
    from tabular.folds import make_folds, read_folds
    from tabular.spec import load_spec

    ham_dir = _store_with_manifest("ham10000-dev-*")
    if ham_dir is None:
        pytest.skip(
            "no HAM10000 feature store under artifacts/stores: run "
            "`invoke embed --spec ../shared/data/ham10000/dataset.toml`"
        )
    ham = FeatureStore.open(ham_dir)
    spec = load_spec(shared_data / "ham10000" / "dataset.toml")
    meta = pd.read_csv(shared_data / "ham10000" / "metadata.csv", dtype={"image_id": str})
    from runfolder.layout import RunLayout
    from runfolder.paths import run_dir

    run_folds = RunLayout(run_dir("ham")).folds
    folds = read_folds(run_folds) if run_folds.is_file() else make_folds(meta, spec)
    folds = folds.set_index("id").loc[meta["image_id"], "fold"].to_numpy()
    stored = meta["image_id"].isin(set(ham.ids)).to_numpy()
    if stored.sum() < 1000:
        pytest.skip(
            f"the HAM10000 store holds {int(stored.sum())} of {len(meta)} images; "
            "fill it with `invoke embed --spec ../shared/data/ham10000/dataset.toml`"
        )
    rows = np.flatnonzero(stored)
    if len(rows) > HAM_ROWS_MAX:  # whole lesions kept: subsample by lesion, seeded
        lesions = meta["lesion_id"].to_numpy()[rows]
        chosen = np.random.default_rng(0).permutation(np.unique(lesions))
        sizes = pd.Series(lesions).value_counts().loc[chosen].cumsum()
        rows = rows[np.isin(lesions, sizes.index[sizes <= HAM_ROWS_MAX])]
    meta, folds = meta.iloc[rows].reset_index(drop=True), folds[rows]
    identity = ham.reference()
    embeddings = ham.read(meta["image_id"])
    cues = acquisition_cues(open_source(shared_data / "ham10000" / "images"), meta["image_id"])

    isic_store = FeatureStore.open(_isic_crops_store(shared_data, identity, tmp_path))
    raw = pd.read_csv(shared_data / "isic2024-mini" / "train-metadata.csv", dtype={"isic_id": str})
    crops_meta = pd.DataFrame(
        {"age": raw["age_approx"], "sex": raw["sex"], "localization": raw["anatom_site_general"]}
    )
    crops_emb = isic_store.read(raw["isic_id"])
    crops_cues = acquisition_cues(
        open_source(shared_data / "isic2024-mini" / "train-image.hdf5"), raw["isic_id"]
    )

    held_marked, crops_marked = [], []
    per_part_held = {p: [] for p in ("image", "acquisition", "metadata")}
    per_part_crops = {p: [] for p in ("image", "acquisition", "metadata")}
    own_held = {p: [] for p in ("image", "acquisition", "metadata")}
    own_crops = {p: [] for p in ("image", "acquisition", "metadata")}
    for fold in np.unique(folds):
        held = folds == fold
        detector = fit_applicability(
            tmp_path / f"fold{fold}",
            folds[~held],
            embeddings=embeddings[~held],
            identity=identity,
            cues=cues.frame.iloc[np.flatnonzero(~held)],
            metadata=meta.iloc[np.flatnonzero(~held)],
            numeric=["age"],
            categorical=["sex", "localization"],
        )
        a = detector.predict(
            embeddings[held],
            cues.frame.iloc[np.flatnonzero(held)],
            meta.iloc[np.flatnonzero(held)],
            identity=isic_store.reference(),
        )
        b = detector.predict(crops_emb, crops_cues, crops_meta, identity=isic_store.reference())
        held_marked.append(a["unlike_training"].to_numpy())
        crops_marked.append(b["unlike_training"].mean())
        for part in per_part_held:
            # marked with this part among the reasons; and this part alone at its own 97.5th pct
            per_part_held[part].append(a["reason"].str.contains(part).to_numpy())
            per_part_crops[part].append(b["reason"].str.contains(part).mean())
            own_held[part].append((a[f"novelty_{part}"] >= 0.975).to_numpy())
            own_crops[part].append((b[f"novelty_{part}"] >= 0.975).mean())
    held_share = float(np.concatenate(held_marked).mean())
    crops_share = float(np.mean(crops_marked))
    print(
        f"\nHAM10000 rows {len(meta)}; held-out HAM marked {held_share:.4f}; "
        f"ISIC 2024 crops marked {crops_share:.4f}"
    )
    for part in per_part_held:
        print(
            f"  {part} among the reasons: held-out HAM "
            f"{np.concatenate(per_part_held[part]).mean():.4f}, "
            f"crops {np.mean(per_part_crops[part]):.4f}; alone at its own 97.5th pct: held-out "
            f"HAM {np.concatenate(own_held[part]).mean():.4f}, crops {np.mean(own_crops[part]):.4f}"
        )
    assert crops_share >= 0.90
    assert held_share <= 0.05


def test_rows_without_a_vector_or_cues_are_scored_by_the_other_parts(world, fitted):
    _, detector = fitted
    emb, cues, meta = world.embeddings(3).astype(np.float32), world.cues(3), world.metadata(3)
    emb[0] = np.nan  # an image that could not be embedded
    cues.iloc[1] = np.nan  # nor measured
    meta.loc[0, "site"] = "sole"
    out = detector.predict(emb, cues, meta, identity=IDENTITY)
    assert np.isnan(out["novelty_image"].iloc[0]) and np.isfinite(out["novelty_image"].iloc[1])
    assert np.isnan(out["novelty_acquisition"].iloc[1])
    assert out["novelty"].notna().all()
    assert out["unlike_training"].iloc[0] and "site = 'sole'" in out["reason"].iloc[0]
