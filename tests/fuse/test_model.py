"""The fusion MLP's shapes, its options, the epoch sampler and the view handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuse.errors import RunError
from fuse.fusion import Embeddings, epoch_rows, minibatches, predict_rows, train_one
from fuse.fusion.model import FusionConfig, FusionMLP
from fuse.fusion.training import Recipe, epoch_size, mixup, run_epoch

# The raw weights (no moving average): the recipe tests below turn each setting on against it.
TINY = FusionConfig(
    image_hidden=16,
    meta_hidden=4,
    fused_hidden=8,
    batch_size=8,
    max_epochs=6,
    dropout=0.1,
    input_dropout=0.0,
    lr=1e-3,
    ema_epochs=0.0,
    patience=6,
    device="cpu",
)


def test_fusion_model_shapes():
    model = FusionMLP(n_image=2048, n_meta=7, config=FusionConfig())
    model.eval()
    out = model(torch.randn(5, 2048), torch.randn(5, 7))
    assert out.shape == (5,)
    assert not model.image_only


def test_image_only_model_takes_no_metadata():
    model = FusionMLP(n_image=32, n_meta=0, config=TINY).eval()
    assert model.image_only and model.meta is None
    assert model(torch.randn(3, 32)).shape == (3,)


def test_fusion_model_without_metadata_input_is_refused():
    model = FusionMLP(n_image=32, n_meta=3, config=TINY).eval()
    with pytest.raises(RunError, match="takes 3 metadata inputs, got None"):
        model(torch.randn(2, 32))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"imbalance": "smote"}, r"imbalance: expected one of .*'smote'"),
        ({"dropout": 1.5}, r"dropout: expected a value in \[0, 1\), got 1.5"),
        ({"input_dropout": -0.1}, r"input_dropout: expected a value in \[0, 1\), got -0.1"),
        ({"batch_size": 0}, "batch_size: expected a positive integer, got 0"),
        ({"pos_weight": -1.0}, "pos_weight: expected a positive number or None, got -1.0"),
        ({"device": "tpu"}, "device: expected auto, cpu or cuda, got 'tpu'"),
        ({"mixup_alpha": -0.2}, r"mixup_alpha: expected a number >= 0 \(0 = no mixup\), got -0.2"),
        (
            {"ema_epochs": -1.0},
            r"ema_epochs: expected a number of epochs >= 0 \(0 = no averaging\), got -1.0",
        ),
        ({"schedule": "step"}, r"schedule: expected one of \('constant', 'cosine'\), got 'step'"),
    ],
)
def test_bad_options_are_refused(change, message):
    with pytest.raises(RunError, match=message):
        FusionConfig(**change)


def test_config_round_trip_and_unknown_key():
    config = FusionConfig(imbalance="oversample", oversample_ratio=0.5)
    assert FusionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(RunError, match=r"unknown key\(s\) \['colour'\]"):
        FusionConfig.from_dict({"colour": "red"})


def test_oversampling_balances_the_training_part_only():
    rng = np.random.default_rng(0)
    y = (np.arange(100) % 5 == 0).astype(int)  # 20% positive
    valid = np.arange(0, 100, 4)
    train = np.setdiff1d(np.arange(100), valid)
    config = FusionConfig(imbalance="oversample", oversample_ratio=1.0)
    rows = epoch_rows(train, y, config, rng)
    assert not np.isin(rows, valid).any()
    assert set(rows.tolist()) == set(train.tolist())  # every training row, nothing else
    positives = int(y[rows].sum())
    negatives = len(rows) - positives
    assert positives == negatives == int((y[train] == 0).sum())
    counts = np.bincount(rows[y[rows] == 1])
    assert counts[counts > 0].max() - counts[counts > 0].min() <= 1  # positives drawn evenly
    half = epoch_rows(train, y, FusionConfig(imbalance="oversample", oversample_ratio=0.5), rng)
    assert int(y[half].sum()) == round(0.5 * negatives)


@pytest.mark.parametrize("imbalance", ["pos_weight", "none"])
def test_without_oversampling_each_training_row_appears_once(imbalance):
    y = (np.arange(50) % 3 == 0).astype(int)
    train = np.arange(10, 50)
    rows = epoch_rows(train, y, FusionConfig(imbalance=imbalance), np.random.default_rng(1))
    assert sorted(rows.tolist()) == train.tolist()


def test_batches_never_leave_a_single_row():
    assert [s.stop - s.start for s in minibatches(17, 8)] == [8, 9]
    assert [s.stop - s.start for s in minibatches(16, 8)] == [8, 8]
    assert sum(s.stop - s.start for s in minibatches(1, 8)) == 1


class RecordingEmbeddings(Embeddings):
    """Embeddings that remember which (row, view) pairs training asked for."""

    def __init__(self, array):
        source = Embeddings.from_array(array)
        super().__init__(source._read, source.n, source.views, source.dim)
        self.picked: list[tuple[np.ndarray, np.ndarray]] = []

    def pick(self, index, views):
        self.picked.append((np.asarray(index).copy(), np.asarray(views).copy()))
        return super().pick(index, views)


def _toy(n=40, views=3, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)
    array = rng.normal(0, 1, (n, views, dim)).astype(np.float16)
    array[y == 1, :, 0] += 2.0
    return array, y


def test_training_draws_every_view_and_never_a_validation_row():
    array, y = _toy()
    embeddings = RecordingEmbeddings(array)
    valid = np.arange(0, 40, 5)
    train = np.setdiff1d(np.arange(40), valid)
    config = FusionConfig(**{**TINY.to_dict(), "patience": 10})
    train_one(embeddings, None, y, train, valid, config)
    rows = np.concatenate([r for r, _ in embeddings.picked])
    views = np.concatenate([v for _, v in embeddings.picked])
    assert not np.isin(rows, valid).any()
    assert set(views.tolist()) == {0, 1, 2}
    # Over six epochs most images were shown in more than one view.
    seen = {r: set() for r in train.tolist()}
    for r, v in zip(rows.tolist(), views.tolist(), strict=True):
        seen[r].add(v)
    assert sum(len(s) > 1 for s in seen.values()) > len(train) // 2


def test_prediction_averages_the_views():
    array, _ = _toy(n=10, views=3)
    model = FusionMLP(12, 2, TINY).eval()
    meta = torch.randn(10, 2)
    p = predict_rows(model, Embeddings.from_array(array), meta, np.arange(10), batch_size=4)
    with torch.no_grad():
        per_view = [
            torch.sigmoid(model(torch.from_numpy(array[:, v].astype(np.float32)), meta))
            for v in range(3)
        ]
    np.testing.assert_allclose(p, torch.stack(per_view).mean(0).numpy(), rtol=1e-5)


def test_state_dict_round_trip_gives_identical_predictions(tmp_path):
    array, y = _toy()
    meta = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
    valid = np.arange(0, 40, 4)
    train = np.setdiff1d(np.arange(40), valid)
    model, p_valid, info = train_one(Embeddings.from_array(array), meta, y, train, valid, TINY)
    torch.save(model.state_dict(), tmp_path / "fold0.pt")
    again = FusionMLP(12, 3, TINY)
    again.load_state_dict(torch.load(tmp_path / "fold0.pt", weights_only=True))
    source = Embeddings.from_array(array)
    before = predict_rows(model, source, torch.from_numpy(meta), valid, batch_size=8 * 4)
    after = predict_rows(again, source, torch.from_numpy(meta), valid, batch_size=8 * 4)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(before, p_valid)
    assert 0 <= info["best_epoch"] < info["epochs"] <= TINY.max_epochs


def test_overlapping_training_and_validation_rows_are_refused():
    array, y = _toy()
    with pytest.raises(RunError, match="overlap"):
        train_one(Embeddings.from_array(array), None, y, np.arange(30), np.arange(25, 40), TINY)


def test_epoch_size_is_what_epoch_rows_returns():
    y = (np.arange(100) % 7 == 0).astype(int)
    train = np.arange(5, 100)
    for config in (
        FusionConfig(),
        FusionConfig(oversample_ratio=0.3),
        FusionConfig(imbalance="none"),
    ):
        rows = epoch_rows(train, y, config, np.random.default_rng(0))
        assert epoch_size(train, y, config) == len(rows)


def test_mixup_makes_convex_mixes_of_rows_of_the_same_batch():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(64, 5)).astype(np.float32))
    meta = torch.from_numpy(rng.normal(size=(64, 3)).astype(np.float32))
    target = torch.from_numpy((np.arange(64) % 2).astype(np.float32))
    mixed_image, mixed_meta, mixed_target = mixup(
        image, meta, target, 0.4, np.random.default_rng(1)
    )
    assert mixed_image.shape == image.shape and mixed_meta.shape == meta.shape
    # Replaying the draws: lam per row and a partner per row; every output is that mix.
    replay = np.random.default_rng(1)
    lam = torch.from_numpy(replay.beta(0.4, 0.4, size=64).astype(np.float32))
    partner = torch.from_numpy(replay.permutation(64))
    torch.testing.assert_close(
        mixed_image, lam[:, None] * image + (1 - lam[:, None]) * image[partner]
    )
    torch.testing.assert_close(mixed_meta, lam[:, None] * meta + (1 - lam[:, None]) * meta[partner])
    torch.testing.assert_close(mixed_target, lam * target + (1 - lam) * target[partner])
    assert ((mixed_target > 0) & (mixed_target < 1)).any()  # soft labels between the classes
    assert 0 <= float(mixed_target.min()) and float(mixed_target.max()) <= 1


def test_mixup_without_a_generator_is_refused():
    array, y = _toy()
    model = FusionMLP(12, 0, TINY)
    recipe = Recipe.make(
        model, y, FusionConfig(**{**TINY.to_dict(), "mixup_alpha": 0.2}), 5, torch.device("cpu")
    )
    with pytest.raises(RunError, match="mixup needs a random generator"):
        run_epoch(
            model,
            recipe,
            Embeddings.from_array(array),
            None,
            y,
            np.arange(40),
            np.zeros(40, dtype=int),
            8,
        )


def test_weight_averaging_keeps_an_exponential_average_of_every_step():
    torch.manual_seed(0)
    model = FusionMLP(6, 0, TINY)
    # A horizon of 2 epochs of 2 steps: decay 1 - 1/4 per step.
    config = FusionConfig(**{**TINY.to_dict(), "ema_epochs": 2.0})
    recipe = Recipe.make(model, np.array([0, 1]), config, 2, torch.device("cpu"))
    expected = None
    for _ in range(4):
        for parameter in model.parameters():
            parameter.data.add_(torch.randn_like(parameter))
        recipe.after_step(model)
        now = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        expected = now if expected is None else {k: 0.75 * expected[k] + 0.25 * now[k] for k in now}
    averaged = recipe.evaluated(model)
    assert averaged is not model
    for name, value in averaged.state_dict().items():
        if name in expected and value.is_floating_point():
            torch.testing.assert_close(value, expected[name])
    assert (
        Recipe.make(model, np.array([0, 1]), TINY, 1, torch.device("cpu")).evaluated(model) is model
    )


def test_cosine_schedule_warms_up_for_an_epoch_then_decays_to_zero():
    model = FusionMLP(6, 0, TINY)
    config = FusionConfig(**{**TINY.to_dict(), "schedule": "cosine", "max_epochs": 3, "lr": 1e-2})
    recipe = Recipe.make(model, np.array([0, 1]), config, 4, torch.device("cpu"))
    rates = []
    for _ in range(12):
        rates.append(recipe.optimizer.param_groups[0]["lr"])
        recipe.optimizer.step()
        recipe.after_step(model)
    np.testing.assert_allclose(rates[:4], [2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert all(
        a > b for a, b in zip(rates[4:-1], rates[5:], strict=True)
    )  # decreasing after the warm-up
    assert recipe.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    constant = Recipe.make(model, np.array([0, 1]), TINY, 4, torch.device("cpu"))
    assert constant.scheduler is None


@pytest.mark.parametrize(
    "change", [{"mixup_alpha": 0.4}, {"ema_epochs": 1.0}, {"schedule": "cosine"}]
)
def test_each_recipe_setting_trains_reproducibly_and_changes_the_model(change):
    array, y = _toy()
    meta = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
    valid = np.arange(0, 40, 4)
    train = np.setdiff1d(np.arange(40), valid)
    config = FusionConfig(**{**TINY.to_dict(), **change})
    source = Embeddings.from_array(array)
    model, p_valid, _ = train_one(source, meta, y, train, valid, config)
    _, again, _ = train_one(source, meta, y, train, valid, config)
    _, plain, _ = train_one(source, meta, y, train, valid, TINY)
    np.testing.assert_array_equal(p_valid, again)
    assert not np.array_equal(p_valid, plain)
    # The kept model (the averaged one with ema_epochs) is the one that made p_valid.
    np.testing.assert_array_equal(
        predict_rows(model, source, torch.from_numpy(meta), valid, 32), p_valid
    )
