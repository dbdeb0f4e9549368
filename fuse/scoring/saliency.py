"""Grad-CAM saliency overlays: where in the image the fusion MLP's score looked.

For each image asked: decode and preprocess it exactly as embedding does (the run's image size,
view 0), run the frozen backbone without autograd to the output of the shallowest block the run's
embedding pools (layer4 for the classic embedding, shape (2048, h, w); layer3 when the store also
pools layer3, (1024, 2h, 2w)), then make that activation the one tensor that needs a gradient:
run the remaining blocks and pool them as the store does to the embedding, run every fold's
fusion MLP with the row's encoded metadata to its logit, average the logits over folds and take
their gradient with respect to the activation (`torch.autograd.grad`, so no `.grad` is left on
any parameter and the backbone's weights are never part of the graph). Each channel is weighted
by its mean gradient, the weighted sum goes through a ReLU, is upsampled to the image, scaled to
0..1 and drawn with a colour map over the image. A map with no position that raises the score is
all zeros and leaves the image untinted.

The forward pass to the activation runs in the precision the scoring embedded with (`amp`: the
mixed-precision autocast of `embed.backbone.autocast_context`, bf16 on CPUs with native bf16),
so the map explains the activations the score came from; the gradient and everything after it
run in float32. On the demo's 6 flagged images on a CPU with native bf16 that forward took 0.21-0.29
s against 0.62 s in float32 (1 thread), and its maps differ from the float32 forward's by at most
0.08 (mean 0.018) on the 0..1 scale.

The map lies at the resolution of that block (7 x 7 for layer4 at 224 px, 14 x 14 for layer3),
so it shows regions, not fine detail; taking it at the shallowest pooled block is what makes it
account for every pooled feature (a deeper block's gradient would miss the shallower block's own
pooled features). The whole image was resized to a square without cropping, so the map covers
the whole image and is stretched back to its aspect.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL import Image

if TYPE_CHECKING:
    from embed.backbone import PooledResNet

log = logging.getLogger(__name__)

# Longest side of an overlay, px (the triage page shows them at its thumbnail size).
OVERLAY_PX = 192
# How strongly the colour map covers the image at heat 0 and at heat 1: where the score did not
# look, the lesion shows through untinted (a floor above 0 washed every image blue-purple).
ALPHA_RANGE = (0.0, 0.6)
# The colour map of the overlays (matplotlib's, imported only when an overlay is drawn).
COLORMAP = "jet"
BATCH = 16

__all__ = [
    "ALPHA_RANGE",
    "BATCH",
    "COLORMAP",
    "OVERLAY_PX",
    "grad_cam",
    "saliency_overlays",
]


def saliency_overlays(
    models,
    frame: pd.DataFrame,
    ids: Sequence[str],
    source,
    weights,
    device: str | torch.device = "cpu",
    *,
    size: int = OVERLAY_PX,
    backbone: PooledResNet | None = None,
    amp: bool = False,
) -> dict[str, bytes]:
    """Grad-CAM overlays (PNG bytes, longest side `size`) of the fusion MLP's score, by id.

    Args:
        models: the run's loaded models (`fuse.scoring.run_models.RunModels`): its fusion folds,
            spec and embedding identity (image size) are used.
        frame: the scored metadata rows (the run spec's id column and features). Each id's
            metadata is encoded with the other rows of its patient, as scoring encodes it.
        ids: the images to explain; only these are computed (a backward pass each).
        source: the image source the ids are read from (`embed.sources.open_source`).
        weights: the backbone's `embed.weights.WeightsInfo` (the run's weights).
        device: where the backbone runs ("auto", "cpu", "cuda").
        size: the overlays' longest side, px.
        backbone: an already loaded `embed.backbone.load_backbone` model for `weights` (None:
            loaded here).
        amp: the backbone's forward pass in the mixed precision the scoring embedded with
            (`grad_cam`); False: float32.

    Returns:
        {id: PNG bytes} for every id whose image could be read and that has a row in `frame`;
        an unreadable image or an id without a row gets no overlay (logged), never an error.
    """
    from embed.backbone_cache import load_cached_backbone
    from embed.config import resolve_device

    ids = list(dict.fromkeys(str(i) for i in ids))
    if not ids:
        return {}
    pictures, arrays, rows, done_ids = _read_images(models, frame, ids, source, size)
    if not done_ids:
        return {}

    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if backbone is None:
        # The run's identity holds blocks and pooling (older runs read as the layer4 average).
        # Grad-CAM runs the eager model in float32, which the TorchScript copy of its stages
        # computes bit for bit without importing torchvision (`embed.backbone_cache`).
        backbone = load_cached_backbone(
            weights,
            device,
            blocks=models.identity["blocks"],
            pooling=models.identity["pooling"],
        )
    meta = _encoded_meta(models, frame, rows)

    started = time.perf_counter()
    out: dict[str, bytes] = {}
    for start in range(0, len(done_ids), BATCH):
        part = slice(start, start + BATCH)
        batch = torch.from_numpy(np.stack(arrays[part]))
        maps = grad_cam(
            backbone,
            models.fusion.folds,
            batch,
            [None if m is None else m[part] for m in meta],
            device,
            amp=amp,
        )
        for image_id, picture, cam in zip(done_ids[part], pictures[part], maps, strict=True):
            out[image_id] = _overlay_png(picture, cam)
    log.info(
        "saliency: %d overlay(s) of %d asked in %.1f s",
        len(out),
        len(ids),
        time.perf_counter() - started,
    )
    return out


def _read_images(models, frame: pd.DataFrame, ids: list[str], source, size: int):
    """(thumbnails, model inputs, row positions in `frame`, ids) of the `ids` that could be read
    and have a row; the others are logged and skipped."""
    from embed.config import EmbedConfig
    from embed.reader import resize_uint8
    from embed.sources import decode_image, safe_reason

    spec = models.run_spec
    image_size = int(models.identity["image_size"])
    max_pixels = EmbedConfig().max_pixels
    keys = frame[spec.id].astype(str)
    positions = pd.Series(np.arange(len(frame)), index=keys.to_numpy())
    positions = positions[~positions.index.duplicated()]
    pictures: list[Image.Image] = []
    arrays: list[np.ndarray] = []
    rows: list[int] = []
    done_ids: list[str] = []
    for image_id in ids:
        if image_id not in positions.index:
            log.warning("saliency %s: no metadata row among the scored rows; no overlay", image_id)
            continue
        try:
            data = source.read_bytes(image_id)
            image = decode_image(data, image_id, max_pixels, draft_size=image_size)
            model_input = resize_uint8(image, image_size)
            if image_size < size:  # the model's draft may be smaller than the overlay
                image = decode_image(data, image_id, max_pixels, draft_size=size)
        except Exception as error:  # noqa: BLE001 - one unreadable image loses its overlay only
            log.warning(
                "saliency %s: image unreadable, no overlay: %s", image_id, safe_reason(error)
            )
            continue
        image = image.copy()
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        pictures.append(image)
        arrays.append(model_input)
        rows.append(int(positions[image_id]))
        done_ids.append(image_id)
    return pictures, arrays, rows, done_ids


def grad_cam(
    backbone: PooledResNet,
    folds,
    batch: torch.Tensor,
    meta: Sequence[np.ndarray | None],
    device: str | torch.device = "cpu",
    *,
    amp: bool = False,
) -> np.ndarray:
    """Grad-CAM maps of the fold-averaged fusion logit at the shallowest pooled block.

    Args:
        backbone: the frozen `embed.backbone.PooledResNet` the run's embeddings came from
            (`embed.backbone.load_backbone` with the run's blocks and pooling).
        folds: [(FusionMLP, encoder)] (`FusionModel.folds`); the MLPs stay where they are.
        batch: uint8 (n, S, S, 3), as `embed.reader.resize_uint8` makes it.
        meta: per fold, the rows' metadata input (n, n_meta) float32, or None for an image-only MLP.
        device: where the backbone runs.
        amp: run the backbone up to the activation under `embed.backbone.autocast_context`
            (what embedding with mixed precision does on `device`; float32 where the device has
            no native half precision); the activation is then cast to float32. False: float32.

    Returns:
        float32 (n, h, w) in 0..1 (that block's grid; all zeros where no position raises the logit).
    """
    from embed.backbone import autocast_context
    from embed.reader import normalize_batch

    x = normalize_batch(batch, device)
    precision = autocast_context(x.device) if amp else contextlib.nullcontext()
    with torch.no_grad(), precision:
        activation = backbone.forward_to(x, backbone.blocks[0]).float()
    activation.requires_grad_(True)
    embedding = backbone.pooled_from(activation)
    logits = []
    for (model, _), rows in zip(folds, meta, strict=True):
        model.eval()
        target = next(model.parameters()).device
        inputs = None if model.image_only or rows is None else torch.as_tensor(rows, device=target)
        logits.append(model(embedding.to(target), inputs).to(activation.device))
    logit = torch.stack(logits).mean(dim=0)
    # Rows are independent (eval mode), so the gradient of the sum is each row's own gradient.
    (gradient,) = torch.autograd.grad(logit.sum(), activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation.detach()).sum(dim=1))
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.cpu().numpy().astype(np.float32)


def _encoded_meta(models, frame: pd.DataFrame, rows: list[int]) -> list[np.ndarray | None]:
    """Per fold, the metadata input of `frame`'s `rows`, encoded with their patients' other rows
    (per-patient features come from the scored rows of the patient, as in scoring)."""
    from fuse.fusion.model import encode_meta
    from tabular.gbdt_model import positional

    spec = models.run_spec
    frame = positional(frame)
    if spec.patient and spec.patient in frame.columns:
        patients = frame[spec.patient]
        wanted = patients.iloc[rows].dropna().unique()
        keep = np.flatnonzero(patients.isin(wanted).to_numpy())
        keep = np.union1d(keep, rows)
    else:
        keep = np.unique(rows)
    subset = frame.iloc[keep].reset_index(drop=True)
    where = np.searchsorted(keep, rows)
    out: list[np.ndarray | None] = []
    for model, encoder in models.fusion.folds:
        out.append(None if model.image_only else encode_meta(encoder, subset)[where])
    return out


def _overlay_png(image: Image.Image, cam: np.ndarray) -> bytes:
    """`cam` (h, w in 0..1) upsampled to `image` and drawn over it with `COLORMAP`, as PNG."""
    import matplotlib  # here: scoring without overlays never loads it

    width, height = image.size
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(cam)[None, None],
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    heat = upsampled.clamp(0, 1).numpy()
    colour = matplotlib.colormaps[COLORMAP](heat)[..., :3]
    low, high = ALPHA_RANGE
    alpha = (low + (high - low) * heat)[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = np.clip((1 - alpha) * base + alpha * colour, 0, 1)
    buffer = io.BytesIO()
    # Default compression, not `optimize`: its search cost 30-40 ms an overlay (4x) for files 1.5%
    # smaller, a visible share of a few lesions' wait; the pixels are the same.
    Image.fromarray((blended * 255 + 0.5).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
