"""Train the fusion MLP on a run's folds, and predict with it.

`train_fusion` reads the image embeddings of a run's rows from a feature store, one mini-batch of
row indices at a time (the store is memory-mapped, so its vectors are never copied whole), and
per fold of the run's `folds.csv`:

- fits the metadata encoder on the training part only;
- handles class imbalance inside the training part only (oversampled positives or a positive
  weight in the loss): a validation row is never duplicated, dropped or seen in training;
- draws one view per image at random each epoch when the store holds several views (the views
  are fixed flips/rotations, so this is augmentation), and predicts validation rows averaging the
  probabilities of all views;
- keeps the epoch with the best validation pauc80 (early stopping after `patience` epochs without
  improvement).

It writes `<run>/fusion/`: `fold{k}.pt` (state dicts), `encoder_fold{k}.json`, `config.json`,
`store.json` (the store's identity), `oof.csv` (id, fold, target, p; the run's row order),
`metrics.json` (summary of the out-of-fold predictions, per-fold figures and the baselines) and,
with baselines, `baselines_oof.csv`.

Baselines trained in the same call on the same folds: a logistic regression on the mean-over-views
embedding + the encoded metadata (standardised, C picked per fold from a small grid on the same
validation pauc80 that stops the MLP, so both get the same selection), and the image branch alone.

Note: the validation part of each fold both stops training (and picks C) and gives the
out-of-fold figure, so the figures carry a small optimistic bias; it is the same for all three
models, so their comparison is fair.

Measured on HAM10000 (8,034 images of `../shared/data/ham10000`, the run's lesion-grouped 5
folds, frozen ResNet-50 at 224 px, 1 view; `invoke train-fusion --spec
../shared/data/ham10000/dataset.toml --run fusion-ham`, CPU), out-of-fold pauc80 / ROC AUC:

    fusion MLP (defaults, imbalance "oversample")           0.1413 / 0.9052
    fusion MLP, imbalance "pos_weight" (same folds, seed)   0.1418 / 0.9024
    logistic regression, embedding + one-hot metadata       0.1370 / 0.8986
    image branch alone (no metadata)                        0.1349 / 0.8927

Over seeds 0-2 (an earlier store of the same weights before a lossless re-conversion),
"oversample" averaged 0.1409 / 0.9045 and "pos_weight" 0.1410 / 0.9014.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from embed.errors import StoreMismatchError
from fuse.errors import RunError
from fuse.model import FusionConfig, FusionMLP, count_parameters, resolve_device
from tabular.errors import preview
from tabular.features import FeatureEncoder
from tabular.metrics import MetricWarning, pauc80, roc_auc, summarize
from tabular.run import Run, open_run
from tabular.spec import DatasetSpec, load_spec

log = logging.getLogger(__name__)

STAGE = "fusion"
# The fields of a store's manifest that decide whether two sets of embeddings are comparable.
STORE_FIELDS = ("backbone", "weights_sha256", "preprocessing", "image_size", "views", "dtype", "dim")
LOGREG_CS = (0.0003, 0.001, 0.003, 0.01)
# Rows of a training part the logistic-regression baseline fits on at most (positives all kept).
LOGREG_MAX_ROWS = 100_000
# Rows sampled from the training part to estimate the embedding's mean and std.
STATS_ROWS = 20_000

RowReader = Callable[[np.ndarray], np.ndarray]


class Embeddings:
    """A run's rows -> embeddings, read in mini-batches.

    `rows(index)` returns shape (len(index), views, dim) for run-row positions `index` (float16
    from a store; an array's own dtype).
    Built from a memory-mapped feature store (`from_store`) or an in-memory array (`from_array`).
    """

    def __init__(self, read: RowReader, n: int, views: int, dim: int):
        self._read = read
        self.n, self.views, self.dim = n, views, dim

    @classmethod
    def from_array(cls, array: np.ndarray) -> Embeddings:
        array = np.asarray(array)
        if array.ndim != 3:
            raise RunError(f"embeddings: expected shape (rows, views, dim), got {array.shape}")
        return cls(lambda index: array[index], array.shape[0], array.shape[1], array.shape[2])

    @classmethod
    def from_store(cls, store, ids: Sequence[str]) -> Embeddings:
        ids = np.asarray(list(ids), dtype=object)
        return cls(lambda index: store.read(ids[index].tolist()), len(ids), int(store.views), int(store.dim))

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Shape (len(index), views, dim), rows in the order asked."""
        return self._read(np.asarray(index))

    def pick(self, index: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Shape (len(index), dim): view `views[i]` of row `index[i]` (one view per image)."""
        block = self.rows(index)
        return block[np.arange(len(block)), np.asarray(views)]

    def mean_over_views(self, batch: int = 4096, dtype=np.float32) -> np.ndarray:
        """Shape (n, dim) of `dtype`: each row's embedding averaged over its views."""
        out = np.empty((self.n, self.dim), dtype=dtype)
        for start in range(0, self.n, batch):
            index = np.arange(start, min(start + batch, self.n))
            out[index] = self.rows(index).astype(np.float32).mean(axis=1)
        return out


def store_identity(manifest: dict, path: Path | str | None = None) -> dict:
    """The fields of a store manifest that models trained on it depend on (+ its path)."""
    identity = {key: manifest.get(key) for key in STORE_FIELDS}
    if path is not None:
        identity["path"] = str(path)
    return identity


def check_identity(expected: dict, actual: dict, what: str) -> None:
    """Raise StoreMismatchError naming the first field of STORE_FIELDS that differs."""
    for key in STORE_FIELDS:
        if key not in expected or key not in actual:
            continue
        # Compared as JSON reads them back (tuples and lists alike).
        want, have = json.loads(json.dumps(expected[key])), json.loads(json.dumps(actual[key]))
        if want != have:
            if isinstance(want, dict) and isinstance(have, dict):
                sub = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[0]
                key, want, have = f"{key}.{sub}", want.get(sub), have.get(sub)
            raise StoreMismatchError(
                f"{what}: field '{key}' differs: the model was trained on {want!r}, got {have!r}; "
                "embed with the same weights and settings, or train a new run"
            )


# --------------------------------------------------------------------------------------------
# training


def train_fusion(
    spec: DatasetSpec | Path | str,
    run_dir: Path | str,
    store_dir: Path | str,
    config: FusionConfig | None = None,
    baselines: bool = True,
    n_folds: int = 5,
    fold_seed: int = 42,
) -> dict:
    """Train the fusion MLP (and its baselines) on the run's folds; write `<run>/fusion/`.

    Args:
        spec: the data set's spec (or a path to one).
        run_dir: the run folder; created with its folds when new, else its folds are reused
            (`n_folds`/`fold_seed` only apply to a new run).
        store_dir: the feature store holding every row's embedding (`invoke embed --spec S`).
        config: model and training options (default `FusionConfig()`).
        baselines: also train the logistic regression and image-only baselines.

    Returns:
        The content of `metrics.json`: `summarize()` of the out-of-fold predictions, plus
        `folds` (per-fold figures), `baselines` (when asked) and `store`.

    Raises:
        DataError: invalid metadata, or a run that began with other metadata columns or spec.
        StoreMismatchError: the store differs from the one this run used before (names the field).
        RunError: the store lacks some of the run's ids (count, first few, and the command that
            embeds them); the store is unreadable.
    """
    from embed.store import FeatureStore

    config = config or FusionConfig()
    if not isinstance(spec, DatasetSpec):
        spec = load_spec(spec)
    run = open_run(spec, run_dir, n_folds=n_folds, seed=fold_seed)
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        raise RunError(
            f"store: no feature store at {store_dir}; make it with `invoke embed --spec {_spec_arg(spec)}`"
        )
    store = FeatureStore.open(store_dir)
    identity = store_identity(store.manifest, store_dir.resolve())
    expected = _recorded_identity(run)
    if expected is not None:
        store.check_compatible({k: v for k, v in expected.items() if k in STORE_FIELDS})
    ids = run.frame[spec.id].astype(str).tolist()
    _check_ids(ids, store, spec, store_dir)
    embeddings = Embeddings.from_store(store, ids)
    log.info(
        "fusion: %d rows x %d view(s) x %d dims from %s; %d folds",
        embeddings.n, embeddings.views, embeddings.dim, store_dir, run.n_folds,
    )
    return _train_all(run, embeddings, identity, config, baselines)


def _spec_arg(spec: DatasetSpec) -> str:
    return str(spec.source or spec.root)


def _recorded_identity(run: Run) -> dict | None:
    """The store identity this run already used (any stage's `store.json`, or `run.json`)."""
    candidates = [run.dir / STAGE / "store.json", run.dir / "store.json"]
    candidates += sorted(p for p in run.dir.glob("*/store.json") if p not in candidates)
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text())
    return run.record.get("store")


def _check_ids(ids: list[str], store, spec: DatasetSpec, store_dir: Path) -> None:
    missing = store.missing(ids)
    if not missing:
        return
    failures = getattr(store, "failures", {}) or {}
    failed = [i for i in missing if i in failures]
    why = ""
    if failed:
        why = f"; {len(failed)} of them failed to embed, e.g. {failed[0]}: {failures[failed[0]]}"
    raise RunError(
        f"store {store_dir} lacks {len(missing)} of the run's {len(ids)} ids "
        f"({preview(missing)}){why}; embed them with `invoke embed --spec {_spec_arg(spec)}`"
    )


def _train_all(run: Run, embeddings: Embeddings, identity: dict, config: FusionConfig,
               baselines: bool) -> dict:
    spec = run.spec
    y = run.target
    fold = run.fold
    out = run.stage_dir(STAGE)
    device = resolve_device(config.device)
    oof = np.full(len(y), np.nan)
    folds_info = []
    oof_image = np.full(len(y), np.nan)
    image_info = []
    encoders = {}
    data = _data_digest(run)
    for k in range(run.n_folds):
        train_rows = np.flatnonzero(fold != k)
        valid_rows = np.flatnonzero(fold == k)
        key = _fold_key(data, identity, config, baselines, k)
        done = _finished_fold(out, k, key, len(valid_rows))
        if done is None:
            done = _train_fold(run, embeddings, config, baselines, device, k, train_rows, valid_rows)
            _save_fold(out, k, key, done)
        else:
            log.info("fusion fold %d: trained before with these settings, data and store; kept "
                     "(delete %s to train it again)", k, out / f"fold{k}.done.json")
        encoders[k] = done["encoder"]
        oof[valid_rows] = done["p_valid"]
        folds_info.append(done["info"])
        if baselines:
            oof_image[valid_rows] = done["p_image"]
            image_info.append(done["image_info"])

    config_record = {
        **config.to_dict(),
        "n_image": embeddings.dim,
        "views": embeddings.views,
        "n_folds": run.n_folds,
        "n_meta": {str(f["fold"]): f["n_meta"] for f in folds_info},
        "parameters": count_parameters(FusionMLP(embeddings.dim, folds_info[0]["n_meta"], config)),
    }
    (out / "config.json").write_text(json.dumps(config_record, indent=2))
    (out / "store.json").write_text(json.dumps(identity, indent=2))
    ids = run.frame[spec.id].astype(str).to_numpy()
    pd.DataFrame({"id": ids, "fold": fold, "target": y, "p": oof}).to_csv(out / "oof.csv", index=False)

    metrics = summarize(y, oof)
    metrics["folds"] = folds_info
    metrics["store"] = identity
    if baselines:
        p_logreg, logreg_info = logistic_baseline(run, embeddings, encoders, seed=config.seed)
        metrics["baselines"] = {
            "logreg": {**_figures(y, p_logreg), "folds": logreg_info},
            "image_only": {**_figures(y, oof_image), "folds": image_info},
        }
        pd.DataFrame(
            {"id": ids, "fold": fold, "target": y, "p_logreg": p_logreg, "p_image_only": oof_image}
        ).to_csv(out / "baselines_oof.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    line = f"fusion OOF: pauc80 {metrics['pauc80']:.4f}, ROC AUC {metrics['roc_auc']:.4f}"
    if baselines:
        for name, figures in metrics["baselines"].items():
            line += f"; {name} pauc80 {figures['pauc80']:.4f}, ROC AUC {figures['roc_auc']:.4f}"
    log.info(line)
    return metrics


# ----------------------------------------------------------------------------- one fold, resumable
# A fold's model, encoder and validation predictions are on disk once `fold<k>.done.json` is:
# a rerun after an interruption (hours at ISIC 2024 scale) trains only the folds not done with
# the same settings, data, folds and store.


def _train_fold(run: Run, embeddings: Embeddings, config: FusionConfig, baselines: bool,
                device, k: int, train_rows: np.ndarray, valid_rows: np.ndarray) -> dict:
    y = run.target
    encoder = FeatureEncoder().fit(run.frame.iloc[train_rows], run.spec)
    meta = encode_meta(encoder, run.frame)
    model, p_valid, info = train_one(
        embeddings, meta, y, train_rows, valid_rows, config, device, seed_key=(k, 0),
        label=f"fusion fold {k}",
    )
    done = {"encoder": encoder, "model": _cpu_state(model), "p_valid": p_valid,
            "info": {"fold": k, "n_meta": int(meta.shape[1]), **info}}
    if baselines:
        _, p_image, info_image = train_one(
            embeddings, None, y, train_rows, valid_rows, config, device, seed_key=(k, 1),
            label=f"image-only fold {k}",
        )
        done.update(p_image=p_image, image_info={"fold": k, **info_image})
    return done


def _data_digest(run: Run) -> str:
    """sha256 of the run's rows (every metadata value), labels and fold assignment."""
    digest = hashlib.sha256()
    digest.update(pd.util.hash_pandas_object(run.frame, index=False).to_numpy().tobytes())
    digest.update(np.ascontiguousarray(run.target, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(run.fold, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _fold_key(data: str, identity: dict, config: FusionConfig, baselines: bool, k: int) -> str:
    """What fold k's result depends on: code version, settings, store, data and folds."""
    from embed.store import lesionfuse_version

    payload = {"code": lesionfuse_version(), "config": config.to_dict(), "baselines": baselines, "fold": k,
               "store": {f: identity.get(f) for f in STORE_FIELDS}, "data": data}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _save_fold(out: Path, k: int, key: str, done: dict) -> None:
    torch.save(done["model"], out / f"fold{k}.pt")
    (out / f"encoder_fold{k}.json").write_text(json.dumps(done["encoder"].to_json(), indent=1))
    record = {"key": key, "info": done["info"], "p_valid": np.asarray(done["p_valid"]).tolist()}
    if "p_image" in done:
        record.update(p_image=np.asarray(done["p_image"]).tolist(), image_info=done["image_info"])
    # Written last and atomically: its presence means the fold's files above are complete.
    tmp = out / f"fold{k}.done.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out / f"fold{k}.done.json")


def _finished_fold(out: Path, k: int, key: str, n_valid: int) -> dict | None:
    """Fold k's saved result when it was made with `key` and its files are all there, else None."""
    path = out / f"fold{k}.done.json"
    encoder_path = out / f"encoder_fold{k}.json"
    if not (path.exists() and encoder_path.exists() and (out / f"fold{k}.pt").exists()):
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key or len(record.get("p_valid", ())) != n_valid:
        return None
    done = {"encoder": FeatureEncoder.from_json(json.loads(encoder_path.read_text())),
            "p_valid": np.asarray(record["p_valid"], dtype=float), "info": record["info"]}
    if "p_image" in record:
        done.update(p_image=np.asarray(record["p_image"], dtype=float), image_info=record["image_info"])
    return done


def encode_meta(encoder: FeatureEncoder, frame: pd.DataFrame) -> np.ndarray:
    """The metadata branch's input: shape (len(frame), n_meta) float32, no NaN."""
    return encoder.mlp_matrix(encoder.transform(frame)).to_numpy(dtype=np.float32)


def _figures(y: np.ndarray, p: np.ndarray) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        return {"pauc80": _none(pauc80(y, p)), "roc_auc": _none(roc_auc(y, p))}


def _none(value: float):
    return None if value is None or not math.isfinite(value) else value


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def epoch_rows(train_rows: np.ndarray, y: np.ndarray, config: FusionConfig,
               rng: np.random.Generator) -> np.ndarray:
    """The training rows of one epoch, shuffled.

    With `imbalance="oversample"`, positives of the training part are repeated so that there
    are about `oversample_ratio` positive draws per negative (each positive the same number of
    times, give or take one); otherwise each training row appears once. Only `train_rows` are
    ever returned.
    """
    train_rows = np.asarray(train_rows)
    if config.imbalance == "oversample":
        positive = train_rows[y[train_rows] == 1]
        negative = train_rows[y[train_rows] == 0]
        wanted = int(round(config.oversample_ratio * len(negative)))
        if len(positive) and wanted > len(positive):
            repeats, extra = divmod(wanted, len(positive))
            chosen = rng.choice(positive, size=extra, replace=False)
            train_rows = np.concatenate([negative, np.repeat(positive, repeats), chosen])
    return rng.permutation(train_rows)


def _batches(n: int, size: int) -> list[slice]:
    """Mini-batch slices; a last batch of one row joins the one before (BatchNorm needs two)."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, [*starts[1:], n], strict=True)]


def _image_stats(embeddings: Embeddings, rows: np.ndarray, rng: np.random.Generator,
                 batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per dimension over (a sample of) the training rows and all their views."""
    if len(rows) > STATS_ROWS:
        rows = np.sort(rng.choice(rows, size=STATS_ROWS, replace=False))
    total = np.zeros(embeddings.dim)
    square = np.zeros(embeddings.dim)
    count = 0
    for part in _batches(len(rows), batch):
        block = embeddings.rows(rows[part]).astype(np.float64).reshape(-1, embeddings.dim)
        total += block.sum(axis=0)
        square += np.square(block).sum(axis=0)
        count += len(block)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(square / max(count, 1) - mean**2, 0.0))
    return mean, std


def train_one(
    embeddings: Embeddings,
    meta: np.ndarray | None,
    y: np.ndarray,
    train_rows: np.ndarray,
    valid_rows: np.ndarray,
    config: FusionConfig,
    device: torch.device | str = "cpu",
    seed_key: tuple[int, ...] = (0,),
    label: str = "fusion",
) -> tuple[FusionMLP, np.ndarray, dict]:
    """Train one model on `train_rows`, early-stopped on `valid_rows`' pauc80.

    Args:
        embeddings: all rows' embeddings (n, views, dim), read per mini-batch.
        meta: (n, m) float32 encoded metadata of all rows, or None for the image branch alone.
        y: (n,) 0/1 targets.
        train_rows, valid_rows: disjoint row positions.
        seed_key: mixed with `config.seed` so that folds and variants draw different numbers.

    Returns:
        (model with the best epoch's weights, on the CPU; validation probabilities averaged over
        views, shape (len(valid_rows),); info dict: best_epoch, epochs, valid_pauc80, seconds).
    """
    device = torch.device(device)
    if np.intersect1d(train_rows, valid_rows).size:
        raise RunError("train_rows and valid_rows overlap: a validation row would be seen in training")
    seed_seq = np.random.SeedSequence([config.seed, *seed_key])
    rng = np.random.default_rng(seed_seq)
    torch_seed = int(seed_seq.generate_state(1)[0])
    y_valid = y[valid_rows]
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        n_meta = 0 if meta is None else meta.shape[1]
        model = FusionMLP(embeddings.dim, n_meta, config)
        model.set_image_stats(*_image_stats(embeddings, train_rows, rng))
        model.to(device)
        meta_t = None if meta is None else torch.from_numpy(np.ascontiguousarray(meta, dtype=np.float32))
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=_pos_weight(y[train_rows], config, device))
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        best = (-math.inf, None, None, -1)  # score, state, predictions, epoch
        stale = 0
        epochs = 0
        bar = tqdm(range(config.max_epochs), desc=label, unit="epoch", leave=False)
        for epoch in bar:
            epochs += 1
            order = epoch_rows(train_rows, y, config, rng)
            views = rng.integers(embeddings.views, size=len(order))
            tick = time.perf_counter()
            loss = run_epoch(model, optimizer, loss_fn, embeddings, meta_t, y, order, views,
                             config.batch_size, device)
            rate = len(order) / max(time.perf_counter() - tick, 1e-9)
            p_valid = predict_rows(model, embeddings, meta_t, valid_rows, config.batch_size * 4, device)
            score = _stop_score(y_valid, p_valid)
            bar.set_postfix(loss=f"{loss:.4f}", val_pauc80=f"{score:.4f}", rows_s=f"{rate:.0f}")
            log.debug("%s epoch %d: loss %.4f, valid pauc80 %.4f, %.0f rows/s", label, epoch, loss, score, rate)
            if score > best[0]:
                best = (score, _cpu_state(model), p_valid, epoch)
                stale = 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
        bar.close()
    model.load_state_dict(best[1])
    model.to("cpu").eval()
    info = {
        "best_epoch": best[3],
        "epochs": epochs,
        "valid_pauc80": _none(best[0]),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("%s: best epoch %d of %d, valid pauc80 %.4f", label, best[3], epochs, best[0])
    return model, best[2], info


def run_epoch(model: FusionMLP, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
              embeddings: Embeddings, meta: torch.Tensor | None, y: np.ndarray, order: np.ndarray,
              views: np.ndarray, batch_size: int, device="cpu") -> float:
    """One pass over `order` (row positions) in mini-batches; returns the mean training loss.

    Row `order[i]` is shown in view `views[i]`; embeddings are read one mini-batch at a time.
    """
    model.train()
    total = 0.0
    batches = _batches(len(order), batch_size)
    # Only ISIC-sized epochs take long enough to deserve a bar of their own.
    for part in tqdm(batches, desc="batches", unit="batch", leave=False, disable=len(batches) < 500):
        rows = order[part]
        # One view per image per epoch: the views are fixed flips/rotations (augmentation).
        image = embeddings.pick(rows, views[part])
        logits = model(
            torch.from_numpy(image.astype(np.float32)).to(device),
            None if meta is None else meta[rows].to(device),
        )
        target = torch.from_numpy(y[rows].astype(np.float32)).to(device)
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(rows)
    return total / max(len(order), 1)


def _pos_weight(y_train: np.ndarray, config: FusionConfig, device) -> torch.Tensor | None:
    if config.imbalance != "pos_weight":
        return None
    positives = int(y_train.sum())
    weight = config.pos_weight
    if weight is None:
        weight = (len(y_train) - positives) / max(positives, 1)
    return torch.tensor(float(weight), device=device)


def _stop_score(y: np.ndarray, p: np.ndarray) -> float:
    """Validation pauc80; minus the log loss when the fold has one class (pauc80 undefined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        score = pauc80(y, p)
    if math.isfinite(score):
        return score
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return -float(np.mean(-(y * np.log(q) + (1 - y) * np.log(1 - q))))


@torch.inference_mode()
def predict_rows(model: FusionMLP, embeddings: Embeddings, meta: torch.Tensor | None,
                 rows: np.ndarray, batch_size: int = 1024, device="cpu") -> np.ndarray:
    """Probabilities of `rows`, shape (len(rows),), each the mean over the row's views."""
    model.eval()
    out = np.empty(len(rows), dtype=np.float64)
    views = embeddings.views
    for start in range(0, len(rows), batch_size):
        index = rows[start:start + batch_size]
        block = embeddings.rows(index).astype(np.float32)
        image = torch.from_numpy(block.reshape(-1, embeddings.dim)).to(device)
        meta_b = None
        if meta is not None and not model.image_only:
            meta_b = meta[index].repeat_interleave(views, dim=0).to(device)
        p = torch.sigmoid(model(image, meta_b).float()).reshape(len(index), views).mean(dim=1)
        out[start:start + len(index)] = p.cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# logistic regression baseline


def logistic_baseline(run: Run, embeddings: Embeddings, encoders: dict[int, FeatureEncoder],
                      cs: Sequence[float] = LOGREG_CS, max_rows: int = LOGREG_MAX_ROWS,
                      seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Out-of-fold probabilities of a logistic regression on mean-over-views embeddings + metadata.

    Features (the mean embedding and the fold's metadata matrix) are standardised on each
    training part; C is picked per fold from `cs` by validation pauc80. A training part larger
    than `max_rows` keeps all its positives and a random share of its negatives (inside the
    training part only), which bounds the baseline's memory and time on ISIC 2024-sized runs.

    Returns:
        (p of shape (n,), per-fold info: C, valid_pauc80, training rows used, seconds).
    """
    from sklearn.linear_model import LogisticRegression

    y = run.target
    # float16 like the store: the mean embedding of every row costs half a view of the store.
    image = embeddings.mean_over_views(dtype=np.float16)
    oof = np.full(len(y), np.nan)
    info = []
    rng = np.random.default_rng(seed)
    for k, encoder in encoders.items():
        started = time.perf_counter()
        train_rows = np.flatnonzero(run.fold != k)
        valid_rows = np.flatnonzero(run.fold == k)
        if len(train_rows) > max_rows:
            positive = train_rows[y[train_rows] == 1]
            negative = train_rows[y[train_rows] == 0]
            keep = rng.choice(negative, size=max(max_rows - len(positive), 1), replace=False)
            train_rows = np.sort(np.concatenate([positive, keep]))
        meta = encode_meta(encoder, run.frame)
        x_train = np.hstack([image[train_rows].astype(np.float32), meta[train_rows]])
        mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)
        std = x_train.std(axis=0, dtype=np.float64).astype(np.float32)
        std[std < 1e-6] = 1.0
        x_train -= mean
        x_train /= std
        x_valid = (np.hstack([image[valid_rows].astype(np.float32), meta[valid_rows]]) - mean) / std
        best = (-math.inf, None, None)
        for c in cs:
            model = LogisticRegression(C=c, max_iter=2000)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter at large C
                model.fit(x_train, y[train_rows])
            p = model.predict_proba(x_valid)[:, 1]
            score = _stop_score(y[valid_rows], p)
            if score > best[0]:
                best = (score, c, p)
        oof[valid_rows] = best[2]
        info.append({"fold": k, "C": best[1], "valid_pauc80": _none(best[0]),
                     "train_rows": int(len(train_rows)),
                     "seconds": round(time.perf_counter() - started, 2)})
        log.info("logreg fold %d: C=%s, valid pauc80 %.4f", k, best[1], best[0])
        del x_train, x_valid
    return oof, info


# --------------------------------------------------------------------------------------------
# prediction


def load_fold_models(stage_dir: Path | str) -> tuple[dict, dict, list[tuple[FusionMLP, FeatureEncoder]]]:
    """Read `config.json`, `store.json` and each fold's state dict and encoder.

    Raises:
        RunError: the folder holds no trained fusion models, or a file is missing.
    """
    stage_dir = Path(stage_dir)
    config_path = stage_dir / "config.json"
    if not config_path.exists():
        raise RunError(
            f"fusion: {stage_dir} holds no trained fusion models (no config.json); "
            "train them with `invoke train-fusion --spec S --run R`"
        )
    record = json.loads(config_path.read_text())
    store = json.loads((stage_dir / "store.json").read_text())
    config = FusionConfig.from_dict({k: v for k, v in record.items() if k in FusionConfig.__dataclass_fields__})
    models = []
    for k in range(int(record["n_folds"])):
        state_path = stage_dir / f"fold{k}.pt"
        encoder_path = stage_dir / f"encoder_fold{k}.json"
        for path in (state_path, encoder_path):
            if not path.exists():
                raise RunError(f"fusion: {path} is missing; retrain with `invoke train-fusion`")
        encoder = FeatureEncoder.from_json(json.loads(encoder_path.read_text()))
        model = FusionMLP(int(record["n_image"]), int(record["n_meta"][str(k)]), config)
        model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        model.eval()
        models.append((model, encoder))
    return record, store, models


def predict_fusion(
    stage_dir: Path | str,
    frame: pd.DataFrame,
    spec: DatasetSpec,
    embeddings: np.ndarray,
    identity: dict | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Probabilities of malignancy: the mean over fold models and over views.

    Args:
        stage_dir: a run's `fusion/` folder.
        frame: metadata rows (the spec's feature columns; no target needed).
        spec: the data set's spec (names the id column in messages).
        embeddings: shape (len(frame), views, dim), the rows' embeddings in frame order.
        identity: the identity of the embeddings (`store_identity(manifest)`, or the same fields
            for freshly computed embeddings); compared with the training store's `store.json`.

    Returns:
        Shape (len(frame),) float64 in [0, 1].

    Raises:
        StoreMismatchError: `identity` differs from the training store's (names the field), or
            the embeddings' width differs from the models'.
        RunError: no trained models; embeddings of the wrong shape or with non-finite values.
    """
    record, store, models = load_fold_models(stage_dir)
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 3 or embeddings.shape[0] != len(frame):
        raise RunError(
            f"embeddings: expected shape ({len(frame)}, views, {record['n_image']}), got {embeddings.shape}"
        )
    if embeddings.shape[2] != int(record["n_image"]):
        raise StoreMismatchError(
            f"embeddings: field 'dim' differs: the model was trained on {record['n_image']}, "
            f"got {embeddings.shape[2]}"
        )
    if identity is not None:
        check_identity(store, identity, "embeddings")
    bad = ~np.isfinite(embeddings).all(axis=(1, 2))
    if bad.any():
        ids = frame[spec.id].astype(str).to_numpy()[bad] if spec.id in frame.columns else np.flatnonzero(bad)
        raise RunError(f"embeddings: non-finite values in rows {preview(list(ids))}")
    source = Embeddings.from_array(embeddings)
    rows = np.arange(len(frame))
    total = np.zeros(len(frame))
    for model, encoder in models:
        meta = torch.from_numpy(encode_meta(encoder, frame))
        total += predict_rows(model, source, meta, rows, batch_size)
    return total / len(models)

