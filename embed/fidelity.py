"""How faithfully an inference variant reproduces fp32 eager vectors: `centred_cosine` of two
(N, D) arrays image by image, and `embed_batches` to make them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from embed.errors import EmbedError

__all__ = ["centred_cosine", "embed_batches"]


def centred_cosine(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How faithfully ``candidate`` vectors reproduce ``reference`` (fp32 eager) vectors.

    Both (N, D), row i of each from the same image. The per-dimension mean of ``reference`` is
    subtracted from both (pooled features of different images share a large common part, which
    would make any two vectors look alike), then the cosine of each row pair is taken.
    Returns {"min", "p1" (1st percentile), "median", "mean", "n"}.
    Raises EmbedError for shapes that differ or fewer than 2 rows.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != cand.shape or ref.shape[0] < 2:
        raise EmbedError(
            f"centred_cosine: expected two (N >= 2, D) arrays of one shape, got {ref.shape} "
            f"and {cand.shape}"
        )
    centre = ref.mean(axis=0)
    ref, cand = ref - centre, cand - centre
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = (ref * cand).sum(axis=1) / np.maximum(norms, 1e-30)
    return {
        "min": float(cos.min()),
        "p1": float(np.percentile(cos, 1)),
        "median": float(np.median(cos)),
        "mean": float(cos.mean()),
        "n": int(cos.size),
    }


def embed_batches(model: Callable, batches: Sequence[torch.Tensor]) -> np.ndarray:
    """(sum N, D) float32 vectors of ``batches`` through ``model`` (a module or a VariantModel)."""
    outs = []
    with torch.inference_mode():
        for batch in batches:
            outs.append(model(batch).float().cpu().numpy())
    return np.concatenate(outs)
