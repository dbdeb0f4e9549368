"""Training one fusion MLP on a training part, early-stopped on a validation part.

Class imbalance is handled inside the training part only (oversampled positives or a positive
weight in the loss): a validation row is never duplicated, dropped or seen in training. When the
store holds several views, one view per image is drawn at random each epoch (the views are fixed
flips/rotations, so this is augmentation), and validation rows are predicted averaging the
probabilities of all their views. The epoch with the best validation pauc80 is kept.

`Recipe` holds what the steps use besides the data: the loss and AdamW, the learning-rate
schedule (constant, or cosine after a warm-up epoch), the moving average of the weights that is
validated and kept (`FusionConfig.ema_epochs`, on by default) and mixup of the training rows'
input vectors (`mixup`, off by default).
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from fuse.errors import RunError
from fuse.fusion.embeddings import Embeddings
from fuse.fusion.model import FusionConfig, FusionMLP
from tabular.metrics import MetricWarning, pauc80

__all__ = [
    "Recipe",
    "cpu_state",
    "ema_decay",
    "epoch_rows",
    "epoch_size",
    "finite_or_none",
    "minibatches",
    "mixup",
    "predict_rows",
    "run_epoch",
    "stop_score",
    "train_one",
]

log = logging.getLogger(__name__)

# Rows sampled from the training part to estimate the embedding's mean and std.
_STATS_ROWS = 20_000


def epoch_size(train_rows: np.ndarray, y: np.ndarray, config: FusionConfig) -> int:
    """How many rows `epoch_rows` returns for this training part (the same every epoch)."""
    train_rows = np.asarray(train_rows)
    if config.imbalance == "oversample":
        positives = int((y[train_rows] == 1).sum())
        negatives = len(train_rows) - positives
        wanted = int(round(config.oversample_ratio * negatives))
        if positives and wanted > positives:
            return negatives + wanted
    return len(train_rows)


def epoch_rows(
    train_rows: np.ndarray, y: np.ndarray, config: FusionConfig, rng: np.random.Generator
) -> np.ndarray:
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


def minibatches(n: int, size: int) -> list[slice]:
    """Mini-batch slices; a last batch of one row joins the one before (BatchNorm needs two)."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, [*starts[1:], n], strict=True)]


def _image_stats(
    embeddings: Embeddings, rows: np.ndarray, rng: np.random.Generator, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per dimension over (a sample of) the training rows and all their views."""
    if len(rows) > _STATS_ROWS:
        rows = np.sort(rng.choice(rows, size=_STATS_ROWS, replace=False))
    total = np.zeros(embeddings.dim)
    square = np.zeros(embeddings.dim)
    count = 0
    for part in minibatches(len(rows), batch):
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
        (model with the best epoch's weights (the averaged weights with `config.ema_epochs`), on
        the CPU; validation probabilities averaged over views, shape (len(valid_rows),); info
        dict: best_epoch, epochs, valid_pauc80, seconds).

    Raises:
        RunError: `train_rows` and `valid_rows` overlap.
    """
    device = torch.device(device)
    if np.intersect1d(train_rows, valid_rows).size:
        raise RunError(
            "train_rows and valid_rows overlap: a validation row would be seen in training"
        )
    seed_seq = np.random.SeedSequence([config.seed, *seed_key])
    rng = np.random.default_rng(seed_seq)
    torch_seed = int(seed_seq.generate_state(1)[0])
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        n_meta = 0 if meta is None else meta.shape[1]
        model = FusionMLP(embeddings.dim, n_meta, config)
        model.set_image_stats(*_image_stats(embeddings, train_rows, rng))
        model.to(device)
        meta_t = (
            None if meta is None else torch.from_numpy(np.ascontiguousarray(meta, dtype=np.float32))
        )
        steps = len(minibatches(epoch_size(train_rows, y, config), config.batch_size))
        recipe = Recipe.make(model, y[train_rows], config, steps, device)
        best, epochs = _fit_epochs(
            model, recipe, embeddings, meta_t, y, train_rows, valid_rows, config, rng, device, label
        )
    model.load_state_dict(best[1])
    model.to("cpu").eval()
    info = {
        "best_epoch": best[3],
        "epochs": epochs,
        "valid_pauc80": finite_or_none(best[0]),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("%s: best epoch %d of %d, valid pauc80 %.4f", label, best[3], epochs, best[0])
    return model, best[2], info


class Recipe:
    """What one model's training steps use: the loss, the optimiser, the learning-rate schedule
    (None when constant), the weight average (None without `ema_epochs`) and the mixup alpha."""

    def __init__(
        self,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        averaged: AveragedModel | None,
        mixup_alpha: float,
    ):
        self.loss_fn, self.optimizer, self.scheduler = loss_fn, optimizer, scheduler
        self.averaged, self.mixup_alpha = averaged, mixup_alpha

    @classmethod
    def make(
        cls,
        model: FusionMLP,
        y_train: np.ndarray,
        config: FusionConfig,
        steps_per_epoch: int,
        device: torch.device,
    ) -> Recipe:
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=_pos_weight(y_train, config, device))
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        scheduler = None
        if config.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, _cosine_with_warmup(steps_per_epoch, steps_per_epoch * config.max_epochs)
            )
        averaged = None
        if config.ema_epochs > 0:
            decay = ema_decay(config.ema_epochs, steps_per_epoch)
            # BatchNorm's running statistics are averaged with the weights (use_buffers), so the
            # averaged network normalises with statistics that match its own weights.
            averaged = AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
            )
        return cls(loss_fn, optimizer, scheduler, averaged, float(config.mixup_alpha))

    def evaluated(self, model: FusionMLP) -> FusionMLP:
        """The network validated and kept: the weight average when there is one."""
        return model if self.averaged is None else self.averaged.module  # type: ignore[return-value]

    def after_step(self, model: FusionMLP) -> None:
        if self.scheduler is not None:
            self.scheduler.step()
        if self.averaged is not None:
            self.averaged.update_parameters(model)


def ema_decay(epochs: float, steps_per_epoch: int) -> float:
    """The moving average's decay per optimiser step for a horizon of `epochs` epochs."""
    return 1.0 - 1.0 / max(epochs * steps_per_epoch, 1.0)


def _cosine_with_warmup(warmup: int, total: int):
    """LambdaLR factor: linear from 1/warmup to 1 over `warmup` steps, then a cosine to 0 at
    step `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _fit_epochs(
    model: FusionMLP,
    recipe: Recipe,
    embeddings: Embeddings,
    meta: torch.Tensor | None,
    y: np.ndarray,
    train_rows: np.ndarray,
    valid_rows: np.ndarray,
    config: FusionConfig,
    rng: np.random.Generator,
    device: torch.device,
    label: str,
) -> tuple[tuple, int]:
    """Epochs until `config.patience` of them bring no better validation pauc80.

    Returns ((score, state dict, validation probabilities, epoch) of the best epoch, epochs run).
    """
    y_valid = y[valid_rows]
    best: tuple = (-math.inf, None, None, -1)
    stale = 0
    epochs = 0
    bar = tqdm(range(config.max_epochs), desc=label, unit="epoch", leave=False)
    for epoch in bar:
        epochs += 1
        order = epoch_rows(train_rows, y, config, rng)
        views = rng.integers(embeddings.views, size=len(order))
        tick = time.perf_counter()
        loss = run_epoch(
            model, recipe, embeddings, meta, y, order, views, config.batch_size, device, rng
        )
        rate = len(order) / max(time.perf_counter() - tick, 1e-9)
        kept = recipe.evaluated(model)
        p_valid = predict_rows(kept, embeddings, meta, valid_rows, config.batch_size * 4, device)
        score = stop_score(y_valid, p_valid)
        bar.set_postfix(loss=f"{loss:.4f}", val_pauc80=f"{score:.4f}", rows_s=f"{rate:.0f}")
        log.debug(
            "%s epoch %d: loss %.4f, valid pauc80 %.4f, %.0f rows/s",
            label,
            epoch,
            loss,
            score,
            rate,
        )
        if score > best[0]:
            best = (score, cpu_state(kept), p_valid, epoch)
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    bar.close()
    return best, epochs


def run_epoch(
    model: FusionMLP,
    recipe: Recipe,
    embeddings: Embeddings,
    meta: torch.Tensor | None,
    y: np.ndarray,
    order: np.ndarray,
    views: np.ndarray,
    batch_size: int,
    device="cpu",
    rng: np.random.Generator | None = None,
) -> float:
    """One pass over `order` (row positions) in mini-batches; returns the mean training loss.

    Row `order[i]` is shown in view `views[i]`; embeddings are read one mini-batch at a time.
    `rng` draws the mixup weights and partners (required when `recipe.mixup_alpha` > 0).
    """
    model.train()
    total = 0.0
    batches = minibatches(len(order), batch_size)
    # Only ISIC-sized epochs take long enough to deserve a bar of their own.
    for part in tqdm(
        batches, desc="batches", unit="batch", leave=False, disable=len(batches) < 500
    ):
        rows = order[part]
        # One view per image per epoch: the views are fixed flips/rotations (augmentation).
        image = torch.from_numpy(embeddings.pick(rows, views[part]).astype(np.float32))
        meta_b = None if meta is None else meta[rows]
        target = torch.from_numpy(y[rows].astype(np.float32))
        if recipe.mixup_alpha > 0:
            if rng is None:
                raise RunError("run_epoch: mixup needs a random generator (rng)")
            image, meta_b, target = mixup(image, meta_b, target, recipe.mixup_alpha, rng)
        logits = model(image.to(device), None if meta_b is None else meta_b.to(device))
        loss = recipe.loss_fn(logits, target.to(device))
        recipe.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        recipe.optimizer.step()
        recipe.after_step(model)
        total += loss.item() * len(rows)
    return total / max(len(order), 1)


def mixup(
    image: torch.Tensor,
    meta: torch.Tensor | None,
    target: torch.Tensor,
    alpha: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Each row mixed with a partner row of the same batch: `lam * row + (1 - lam) * partner`.

    image (B, dim), meta (B, m) or None, target (B,) -> the same shapes; `lam` ~ Beta(alpha,
    alpha) per row, partners a random permutation of the batch. The embedding is mixed before
    the model standardises it, which is the same mix (standardising is affine).
    """
    n = len(target)
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=n).astype(np.float32))
    partner = torch.from_numpy(rng.permutation(n))
    image = lam[:, None] * image + (1 - lam[:, None]) * image[partner]
    if meta is not None:
        meta = lam[:, None] * meta + (1 - lam[:, None]) * meta[partner]
    return image, meta, lam * target + (1 - lam) * target[partner]


def _pos_weight(y_train: np.ndarray, config: FusionConfig, device) -> torch.Tensor | None:
    if config.imbalance != "pos_weight":
        return None
    positives = int(y_train.sum())
    weight = config.pos_weight
    if weight is None:
        weight = (len(y_train) - positives) / max(positives, 1)
    return torch.tensor(float(weight), device=device)


def stop_score(y: np.ndarray, p: np.ndarray) -> float:
    """Validation pauc80; minus the log loss when the fold has one class (pauc80 undefined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        score = pauc80(y, p)
    if math.isfinite(score):
        return score
    from sklearn.metrics import log_loss  # training only: scoring never calls it

    return -float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))


@torch.inference_mode()
def predict_rows(
    model: FusionMLP,
    embeddings: Embeddings,
    meta: torch.Tensor | None,
    rows: np.ndarray,
    batch_size: int = 1024,
    device="cpu",
) -> np.ndarray:
    """Probabilities of `rows`, shape (len(rows),), each the mean over the row's views."""
    model.eval()
    out = np.empty(len(rows), dtype=np.float64)
    views = embeddings.views
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        block = embeddings.rows(index).astype(np.float32)
        image = torch.from_numpy(block.reshape(-1, embeddings.dim)).to(device)
        meta_b = None
        if meta is not None and not model.image_only:
            meta_b = meta[index].repeat_interleave(views, dim=0).to(device)
        p = torch.sigmoid(model(image, meta_b).float()).reshape(len(index), views).mean(dim=1)
        out[start : start + len(index)] = p.cpu().numpy()
    return out


def finite_or_none(value: float):
    return None if value is None or not math.isfinite(value) else value


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
