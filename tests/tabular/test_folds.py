"""Folds: groups never straddle folds, both classes in every fold, same seed same folds."""

import warnings

import numpy as np
import pandas as pd
import pytest

from tabular.errors import DataError
from tabular.folds import make_folds
from tabular.spec import load_spec
from tabular.validate import read_metadata


@pytest.fixture(
    scope="module", params=["ham10000/dataset.toml", "isic2020/dataset.toml", "isic2024-mini"]
)
def real(request, shared_data):
    spec = load_spec(shared_data / request.param)
    return spec, read_metadata(spec)


def test_no_group_straddles_folds_and_each_fold_has_both_classes(real):
    spec, frame = real
    folds = make_folds(frame, spec, n_folds=5, seed=1)
    assert folds.groupby("group")["fold"].nunique().max() == 1
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    for k in range(5):
        in_fold = frame[spec.target].to_numpy()[folds["fold"].to_numpy() == k]
        assert set(in_fold) == {0, 1}
    assert (folds["id"].to_numpy() == frame[spec.id].to_numpy()).all()


@pytest.mark.parametrize("seed", [0, 7])
def test_same_seed_same_folds_and_train_test_groups_disjoint(real, seed):
    spec, frame = real
    a = make_folds(frame, spec, seed=seed)
    b = make_folds(frame, spec, seed=seed)
    assert a.equals(b)
    for k in range(5):
        valid = set(a.loc[a.fold == k, "group"])
        train = set(a.loc[a.fold != k, "group"])
        assert not valid & train


def tiny(n_pos: int) -> tuple:
    from pathlib import Path

    from tabular.spec import DatasetSpec

    spec = DatasetSpec(
        name="t",
        root=Path("."),
        metadata=Path("m.csv"),
        images=None,
        id="id",
        target="y",
        group="g",
    )
    y = np.zeros(20, dtype=int)
    y[:n_pos] = 1
    frame = pd.DataFrame(
        {"id": [f"i{i}" for i in range(20)], "g": [f"g{i}" for i in range(20)], "y": y}
    )
    return spec, frame


def test_one_class_fold_warns_instead_of_crashing():
    spec, frame = tiny(n_pos=2)
    with pytest.warns(UserWarning, match="has one class only"):
        folds = make_folds(frame, spec, n_folds=5)
    assert len(folds) == 20


def test_bad_n_folds_and_too_few_groups():
    spec, frame = tiny(n_pos=5)
    with pytest.raises(DataError, match="n_folds must be an integer >= 2, got: 1"):
        make_folds(frame, spec, n_folds=1)
    with pytest.raises(DataError, match="needs at least as many groups; column 'g' has 20"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_folds(frame, spec, n_folds=21)
