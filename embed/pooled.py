"""Which pooled backbone features a store keeps: the blocks, their pooling, the defaults.

Torch-free, so that the command line's help and a store's identity can name them cheaply.
`embed.backbone.PooledResNet` computes them.
"""

from __future__ import annotations

from embed.errors import EmbedError

__all__ = [
    "BLOCKS",
    "BLOCK_DIMS",
    "BLOCK_STRIDES",
    "DEFAULT_BLOCKS",
    "DEFAULT_POOLING",
    "GEM_P",
    "POOLINGS",
    "SMALL_IMAGE_SIZE",
    "TRAINED_IMAGE_SIZE",
    "check_features",
    "feature_dim",
    "min_image_size",
]


# The residual stages a store can pool, in forward order, and their channels.
BLOCK_DIMS: dict[str, int] = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
BLOCKS: tuple[str, ...] = tuple(BLOCK_DIMS)
# Each stage's output stride: one cell of its map stands for a stride x stride patch of the input.
BLOCK_STRIDES: dict[str, int] = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
# The input side the ImageNet weights were trained at, and the side below which their features
# drift far from what they were trained to mean (objects 2x smaller than any seen in training).
TRAINED_IMAGE_SIZE = 224
SMALL_IMAGE_SIZE = 112
# "avg": global average pool (torchvision's). "gem": generalised mean, (mean x^p)^(1/p) with
# p = GEM_P, which leans towards the strongest responses of a channel (a small dark network or
# a blue-white veil in one corner of a lesion counts for more than in a plain average).
POOLINGS: tuple[str, ...] = ("avg", "gem")
GEM_P = 3.0

# What a store keeps unless told otherwise, chosen on HAM10000 development out-of-fold figures
# (the README's table).
DEFAULT_BLOCKS: tuple[str, ...] = ("layer3",)
DEFAULT_POOLING = "gem"


def min_image_size(blocks) -> int:
    """The smallest input side (px) the pooled `blocks` can use: the deepest one's stride.

    Every stride-2 stage then halves a map of at least 2 x 2, so the deepest block's map is at
    least 1 x 1 cell, each cell computed from a full stride x stride patch of image. Below it an
    earlier stage already collapsed to 1 x 1 and the later stride-2 convolutions see mostly their
    zero padding: the network still returns vectors, but not the features it was trained to
    compute (layer3: 16 px, layer4: 32 px).
    """
    return max(BLOCK_STRIDES[b] for b in check_features(blocks, DEFAULT_POOLING))


def check_features(blocks, pooling: str) -> tuple[str, ...]:
    """`blocks` in forward order, checked (known, none twice, at least one) with `pooling`.

    `blocks` may be a comma-separated string ("layer3,layer4") or a sequence of names.
    Raises EmbedError naming the unknown block or pooling.
    """
    if isinstance(blocks, str):
        blocks = [part.strip() for part in blocks.split(",") if part.strip()]
    blocks = list(blocks)
    unknown = [b for b in blocks if b not in BLOCK_DIMS]
    if unknown or not blocks or len(set(blocks)) != len(blocks):
        raise EmbedError(
            f"blocks: expected one or more distinct of {list(BLOCKS)} (e.g. 'layer3,layer4'), "
            f"got {blocks!r}"
        )
    if pooling not in POOLINGS:
        raise EmbedError(f"pooling: expected one of {list(POOLINGS)}, got {pooling!r}")
    return tuple(b for b in BLOCKS if b in blocks)


def feature_dim(blocks) -> int:
    """Length of the pooled vector of `blocks` (their channels, concatenated)."""
    return sum(BLOCK_DIMS[b] for b in blocks)
