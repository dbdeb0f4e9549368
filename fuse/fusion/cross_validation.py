"""Cross-validated training of the fusion MLP on a run's folds, resumable fold by fold.

`train_fusion` reads the image embeddings of a run's rows from a feature store (checked by
`fuse.stores`: every row has a vector made from its current image, and the store's embedding
identity matches every other image-reading stage of the run) and, per fold of the run's
`folds.csv`, fits the metadata encoder on the training part only and trains one MLP
(`fuse.fusion.training`), plus, on the same folds, the image branch alone and a logistic
regression (`fuse.fusion.baselines`).

It writes `<run>/fusion/`: `fold{k}.pt` (state dicts), `encoder_fold{k}.json`, `config.json`,
`store.json` (the store it read), `oof.csv` (id, fold, target, p; the run's row order),
`metrics.json` (the out-of-fold figures, per fold and of the baselines) and, with baselines,
`baselines_oof.csv`.

The stage is written into `<run>/fusion.new/` and swapped in as `<run>/fusion/` only when every
fold, the out-of-fold file and the metrics are there: a failed or killed retrain leaves the
previous `fusion/` whole. A fold's model, encoder and validation predictions are on disk once
`fold<k>.done.json` is: a rerun after an interruption (hours at ISIC 2024 scale) finds the folds
done in `fusion.new/` (kept when training stops), and takes over those of the current `fusion/`
(copied) when they were made with the same code version, settings, data, folds and the same
vectors (the digest of what the stage read, `fuse.stores.rows_digest`); it trains the rest. A
re-embedded image changes that digest, so every fold is trained again (a changed row is in the
training part of every fold but one, and the validation part of that one).

Note: the validation part of each fold both stops training (and picks C) and gives the
out-of-fold figure, so the figures carry a small optimistic bias; it is the same for all three
models, so their comparison is fair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.files import atomic_write, atomic_write_json, reporting_write_errors
from common.version import lesionfuse_version
from embed.config import resolve_device
from embed.identity import identity_of
from fuse.fusion.baselines import logistic_baseline
from fuse.fusion.embeddings import Embeddings
from fuse.fusion.model import FusionConfig, FusionMLP, count_parameters, encode_meta
from fuse.fusion.predict import CONFIG_FILE, member_file
from fuse.fusion.training import cpu_state, finite_or_none, train_one
from fuse.stores import check_same_embeddings, open_for_training
from runfolder.layout import RunLayout
from runfolder.records import record_store
from tabular.features import FeatureEncoder
from tabular.metrics import MetricWarning, pauc80, roc_auc, summarize
from tabular.run import Run, open_run
from tabular.spec import DatasetSpec, load_spec

__all__ = ["STAGE", "train_fusion"]

log = logging.getLogger(__name__)

STAGE = "fusion"


def train_fusion(
    spec: DatasetSpec | Path | str,
    run_dir: Path | str,
    store_dir: Path | str | None,
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
        StoreMismatchError: the store's embeddings differ from those another stage of this run
            (or an earlier fusion stage) was trained on (names the field and the stage).
        RunError: no store; the store lacks some of the run's ids (count, first few, and the
            command that embeds them); some images changed since they were embedded.
        WriteError: the run folder cannot be written (read-only, full): names the path.
    """
    config = config or FusionConfig()
    if not isinstance(spec, DatasetSpec):
        spec = load_spec(spec)
    with reporting_write_errors("train-fusion", run_dir):  # a new run writes its folds
        run = open_run(spec, run_dir, n_folds=n_folds, seed=fold_seed)
    layout = RunLayout(run.dir)
    ids = run.frame[spec.id].astype(str).tolist()
    opened = open_for_training(spec, ids, store_dir, run=layout)
    reference = opened.reference
    check_same_embeddings(layout, reference, f"feature store {str(opened.store.path)!r}")
    embeddings = Embeddings.from_store(opened.store, ids)
    log.info(
        "fusion: %d rows x %d view(s) x %d dims from %s; %d folds",
        embeddings.n,
        embeddings.views,
        embeddings.dim,
        opened.store.path,
        run.n_folds,
    )
    with reporting_write_errors("train-fusion", layout.dir):
        with layout.rewriting(STAGE, resumable=True) as out:
            metrics = _train_all(
                run, embeddings, reference, config, baselines, out, layout.stage(STAGE)
            )
            record_store(layout, out.name, reference)
    return metrics


def _train_all(
    run: Run,
    embeddings: Embeddings,
    identity: dict,
    config: FusionConfig,
    baselines: bool,
    out: Path,
    previous: Path,
) -> dict:
    """Every fold into `out` (the stage being written), reusing finished folds of `out` and of
    `previous` (the current stage) made with the same key."""
    spec = run.spec
    y = run.target
    fold = run.fold
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
        if done is None and _finished_fold(previous, k, key, len(valid_rows)) is not None:
            _adopt_fold(previous, out, k, config.members)
            done = _finished_fold(out, k, key, len(valid_rows))
        if done is None:
            done = _train_fold(
                run, embeddings, config, baselines, device, k, train_rows, valid_rows
            )
            _save_fold(out, k, key, done)
        else:
            log.info(
                "fusion fold %d: trained before with these settings, data and vectors; kept "
                "(delete %s to train it again)",
                k,
                previous / f"fold{k}.done.json",
            )
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
    layout = RunLayout(run.dir)
    layout.write_json(out.name, CONFIG_FILE, config_record)
    ids = run.frame[spec.id].astype(str).to_numpy()
    layout.write_oof(out.name, ids, fold, y, oof)

    metrics = summarize(y, oof)
    metrics["folds"] = folds_info
    metrics["store"] = identity
    if baselines:
        p_logreg, logreg_info = logistic_baseline(run, embeddings, encoders, seed=config.seed)
        metrics["baselines"] = {
            "logreg": {**_figures(y, p_logreg), "folds": logreg_info},
            "image_only": {**_figures(y, oof_image), "folds": image_info},
        }
        frame = pd.DataFrame(
            {"id": ids, "fold": fold, "target": y, "p_logreg": p_logreg, "p_image_only": oof_image}
        )
        atomic_write(out / "baselines_oof.csv", lambda f: frame.to_csv(f, index=False))
    layout.write_metrics(out.name, metrics)
    line = f"fusion OOF: pauc80 {metrics['pauc80']:.4f}, ROC AUC {metrics['roc_auc']:.4f}"
    if baselines:
        for name, figures in metrics["baselines"].items():
            line += f"; {name} pauc80 {figures['pauc80']:.4f}, ROC AUC {figures['roc_auc']:.4f}"
    log.info(line)
    return metrics


def _train_fold(
    run: Run,
    embeddings: Embeddings,
    config: FusionConfig,
    baselines: bool,
    device,
    k: int,
    train_rows: np.ndarray,
    valid_rows: np.ndarray,
) -> dict:
    y = run.target
    encoder = FeatureEncoder().fit(run.frame.iloc[train_rows], run.spec)
    meta = encode_meta(encoder, run.frame)
    states, predictions, infos = [], [], []
    for member in range(config.members):
        # Member 0 draws what a single model drew, so members=1 is the single model exactly.
        seed_key = (k, 0) if member == 0 else (k, 0, member)
        label = f"fusion fold {k}" + (f" member {member}" if config.members > 1 else "")
        model, p_member, info = train_one(
            embeddings,
            meta,
            y,
            train_rows,
            valid_rows,
            config,
            device,
            seed_key=seed_key,
            label=label,
        )
        states.append(cpu_state(model))
        predictions.append(p_member)
        infos.append(info)
    info = (
        infos[0]
        if config.members == 1
        else {
            "best_epoch": [i["best_epoch"] for i in infos],
            "epochs": [i["epochs"] for i in infos],
            "valid_pauc80": finite_or_none(pauc80(y[valid_rows], np.mean(predictions, axis=0))),
            "seconds": round(sum(i["seconds"] for i in infos), 2),
        }
    )
    done = {
        "encoder": encoder,
        "models": states,
        "p_valid": np.mean(predictions, axis=0),
        "info": {"fold": k, "n_meta": int(meta.shape[1]), **info},
    }
    if baselines:
        _, p_image, info_image = train_one(
            embeddings,
            None,
            y,
            train_rows,
            valid_rows,
            config,
            device,
            seed_key=(k, 1),
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
    """What fold k's result depends on: code version, settings, store, data, folds, and the
    vectors read (the digest `identity["read"]`, recorded by `fuse.stores.SpecStore.reference`)."""
    payload = {
        "code": lesionfuse_version(),
        "config": config.to_dict(),
        "baselines": baselines,
        "fold": k,
        "store": identity_of(identity),
        "data": data,
        "read": identity.get("read"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _save_fold(out: Path, k: int, key: str, done: dict) -> None:
    # A record of an earlier try with other settings must not vouch for the files rewritten below.
    (out / f"fold{k}.done.json").unlink(missing_ok=True)
    for member, state in enumerate(done["models"]):
        torch.save(state, out / member_file(k, member))
    atomic_write_json(out / f"encoder_fold{k}.json", done["encoder"].to_json(), indent=1)
    record = {"key": key, "info": done["info"], "p_valid": np.asarray(done["p_valid"]).tolist()}
    if "p_image" in done:
        record.update(p_image=np.asarray(done["p_image"]).tolist(), image_info=done["image_info"])
    # Written last and atomically: its presence means the fold's files above are complete.
    atomic_write_json(out / f"fold{k}.done.json", record, indent=None)


def _adopt_fold(previous: Path, out: Path, k: int, members: int) -> None:
    """Copy fold k's finished files from the current stage into the one being written."""
    names = [member_file(k, m) for m in range(members)] + [f"encoder_fold{k}.json"]
    for name in names:
        shutil.copy2(previous / name, out / name)
    # Last, as `_save_fold` writes it: its presence means the fold's files above are complete.
    shutil.copy2(previous / f"fold{k}.done.json", out / f".tmp-fold{k}.done.json")
    (out / f".tmp-fold{k}.done.json").replace(out / f"fold{k}.done.json")


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
    done = {
        "encoder": FeatureEncoder.from_json(json.loads(encoder_path.read_text())),
        "p_valid": np.asarray(record["p_valid"], dtype=float),
        "info": record["info"],
    }
    if "p_image" in record:
        done.update(
            p_image=np.asarray(record["p_image"], dtype=float), image_info=record["image_info"]
        )
    return done


def _figures(y: np.ndarray, p: np.ndarray) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        return {"pauc80": finite_or_none(pauc80(y, p)), "roc_auc": finite_or_none(roc_auc(y, p))}
