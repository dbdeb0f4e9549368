"""The applicability detector's settings (`ApplicabilityConfig`), checked when they are made."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from runfolder.errors import RunError

__all__ = ["ApplicabilityConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplicabilityConfig:
    """Settings of the detector.

    marked_share: share of the training rows marked unlike training, out of fold (0.025).
    neighbours: k of the image part's k-nearest-neighbour similarity (5).
    max_reference: most training embeddings kept as the image part's reference (20,000; a
        seeded subsample beyond that).
    numeric_margin: a numeric value counts as out of range beyond the training minimum or
        maximum by more than this share of the training range (0.1).
    seed: seed of the reference subsample (0).
    image_method: "pca-residual" (the default: the residual outside the training images'
        `image_components` principal directions) or "knn" (cosine distance to the `neighbours`
        nearest training embeddings); measured in
        `fuse.applicability.image_part.ResidualImagePart`.
    image_components: principal directions of the pca-residual image part (16).
    """

    marked_share: float = 0.025
    neighbours: int = 5
    max_reference: int = 20_000
    numeric_margin: float = 0.1
    seed: int = 0
    image_method: str = "pca-residual"
    image_components: int = 16

    def __post_init__(self) -> None:
        share = self.marked_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 0.5:
            raise RunError(
                f"ApplicabilityConfig.marked_share: expected a share in (0, 0.5), e.g. 0.025, "
                f"got {share!r}"
            )
        if self.image_method not in ("pca-residual", "knn"):
            raise RunError(
                f"ApplicabilityConfig.image_method: expected 'pca-residual' or 'knn', got "
                f"{self.image_method!r}"
            )
        for name in ("neighbours", "max_reference", "image_components"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RunError(
                    f"ApplicabilityConfig.{name}: expected a positive integer, got {value!r}"
                )
        margin = self.numeric_margin
        if isinstance(margin, bool) or not isinstance(margin, int | float) or margin < 0:
            raise RunError(
                f"ApplicabilityConfig.numeric_margin: expected a number >= 0, got {margin!r}"
            )
