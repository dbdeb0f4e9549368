"""The frozen ResNet-50 backbone: model, input transform, precision and memory-format helpers."""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np
import torch
from PIL import Image

from embed.errors import EmbedError
from embed.pooled import BLOCKS, DEFAULT_BLOCKS, DEFAULT_POOLING, GEM_P, check_features, feature_dim
from embed.resnet50 import INPUT_MEAN, INPUT_STD
from embed.weights import (
    STRIDE_KERAS_V1,
    STRIDE_LAYOUTS,
    STRIDE_TORCHVISION,
    WeightsInfo,
    file_sha256,
)

log = logging.getLogger(__name__)

BACKBONE_NAME = "resnet50-keras-imagenet"


# What a feature store records about the input transform, so that a store made with another
# transform (or another stride layout) is refused. The whole image is resized to a square without
# cropping: lesion crops (ISIC 2024 tiles, dermoscopy) are square or nearly so (HAM10000 is 4:3),
# the lesion fills most of the frame, and its border and surrounding skin carry the asymmetry and
# border cues a centre crop would cut off; a mild aspect change costs less than losing the edge.
PREPROCESSING: dict = {
    "resize": "whole image to image_size x image_size, no crop",
    "interpolation": "bilinear",
    "antialias": True,
    "to_tensor": "uint8 0..255 -> float32 0..1",
    "normalize_mean": list(INPUT_MEAN),
    "normalize_std": list(INPUT_STD),
    "channels": "RGB",
    "stride_layout": STRIDE_KERAS_V1,
}

_MEAN = np.asarray(INPUT_MEAN, dtype=np.float32) * 255.0
_INV_STD = 1.0 / (np.asarray(INPUT_STD, dtype=np.float32) * 255.0)


def preprocessing_for(weights: WeightsInfo) -> dict:
    """``PREPROCESSING`` with the stride layout of ``weights`` (what a store should record)."""
    return {**PREPROCESSING, "stride_layout": weights.stride_layout}


def preprocess(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize (bilinear, antialiased, no crop) and normalise one image as ``PREPROCESSING`` says.

    image: a PIL image (converted to RGB if it is not). Returns float32 (3, image_size, image_size).
    Raises EmbedError for a non-positive ``image_size``.
    """
    if image_size <= 0:
        raise EmbedError(f"image_size: expected a positive integer, got {image_size}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (image_size, image_size):
        # PIL's bilinear widens its kernel when shrinking, i.e. it is antialiased, as
        # torchvision's Resize(antialias=True) is.
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3) in 0..255
    array = (array - _MEAN) * _INV_STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def pool(activation: torch.Tensor, pooling: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) float32 by `pooling` ("avg" or "gem").

    GeM is computed in float32: under fp16 autocast the cube of an activation of 41 or more
    would overflow.
    """
    if pooling == "avg":
        return torch.nn.functional.adaptive_avg_pool2d(activation, 1).flatten(1).float()
    x = activation.float().clamp(min=1e-6)
    return x.pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)


# One leaf call in a traced graph (torch.fx): graph rewrites such as int8 quantization
# (`embed.variants`) then leave the pooling whole and in float32 instead of quantizing its
# clamp and cube, which destroyed GeM's vectors (centred cosine 0.32 to fp32).
torch.fx.wrap("pool")


class PooledResNet(torch.nn.Module):
    """A torchvision ResNet-50 run up to its deepest pooled block; forward gives the pooled
    features of `blocks`, concatenated in forward order: (N, feature_dim(blocks)) float32.

    Keeps torchvision's attribute names (conv1, bn1, relu, maxpool, layer1..). Stages after the
    deepest pooled block are dropped: pooling layer3 alone skips layer4's share of the work.
    `forward` is `pooled_from(forward_to(x, blocks[0]))`; Grad-CAM (`fuse.scoring.saliency`) calls
    the two halves itself, to take the gradient at the shallowest pooled block.
    """

    # Taken from the torchvision model in __init__ (by name, with the stages).
    conv1: torch.nn.Module
    bn1: torch.nn.Module
    relu: torch.nn.Module
    maxpool: torch.nn.Module

    def __init__(self, resnet: torch.nn.Module, blocks, pooling: str):
        super().__init__()
        self.blocks = check_features(blocks, pooling)
        self.pooling = pooling
        self.stages = BLOCKS[: BLOCKS.index(self.blocks[-1]) + 1]
        for name in ("conv1", "bn1", "relu", "maxpool", *self.stages):
            setattr(self, name, getattr(resnet, name))

    @property
    def dim(self) -> int:
        return feature_dim(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled_from(self.forward_to(x, self.blocks[0]))

    def forward_to(self, x: torch.Tensor, block: str) -> torch.Tensor:
        """The stem and the stages up to and including `block`: (N, channels, h, w)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages[: self.stages.index(block) + 1]:
            x = getattr(self, name)(x)
        return x

    def pooled_from(self, activation: torch.Tensor) -> torch.Tensor:
        """The pooled features from `activation`, the output of the shallowest pooled block:
        the later stages run on it and each pooled block's output is pooled."""
        later = self.stages[self.stages.index(self.blocks[0]) + 1 :]
        x, pooled = activation, [pool(activation, self.pooling)]
        for name in later:
            x = getattr(self, name)(x)
            if name in self.blocks:
                pooled.append(pool(x, self.pooling))
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)


def set_stride_layout(model: torch.nn.Module, layout: str) -> None:
    """Put the stride-2 of layer2..layer4's first block where ``layout`` says.

    Keras/Caffe ResNet v1 (``"keras-v1"``) strides the 1x1 conv1 of the bottleneck; torchvision
    (``"torchvision-v1.5"``) strides the 3x3 conv2. Loading one layout's weights into the other
    gives features with a cosine of only 0.88-0.95 to the right ones.
    """
    if layout not in STRIDE_LAYOUTS:
        raise EmbedError(f"stride_layout: expected one of {STRIDE_LAYOUTS}, got {layout!r}")
    one_by_one = (2, 2) if layout == STRIDE_KERAS_V1 else (1, 1)
    three_by_three = (1, 1) if layout == STRIDE_KERAS_V1 else (2, 2)
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(model, name)[0]
        block.conv1.stride = one_by_one
        block.conv2.stride = three_by_three


def load_backbone(
    weights: WeightsInfo,
    device: torch.device | str = "cpu",
    keep_classifier: bool = False,
    *,
    blocks=DEFAULT_BLOCKS,
    pooling: str = DEFAULT_POOLING,
) -> torch.nn.Module:
    """Build the frozen ResNet-50 for ``weights``, pooling ``blocks`` by ``pooling``.

    The file's sha256 is checked against ``weights.sha256``, the state dict is loaded with
    ``weights_only=True`` and ``strict=True``, the stride layout is set from
    ``weights.stride_layout``. The model is in eval mode with ``requires_grad`` False, on
    ``device``, in the default memory format (see ``prepare_model``). Input: (N, 3, H, W) float32
    made by ``preprocess``. Output: a ``PooledResNet``'s (N, feature_dim(blocks)) pooled
    features (layer4 average: 2048, the classic embedding), or the whole torchvision model's
    (N, 1000) ImageNet logits when ``keep_classifier`` is True.

    Raises EmbedError when the file changed since it was verified or does not load, or for an
    unknown block or pooling.
    """
    check_features(blocks, pooling)
    import torchvision  # deferred: importing torchvision costs about a second

    actual = file_sha256(weights.path)  # hashed again only if the file changed since
    if actual != weights.sha256:
        raise EmbedError(
            f"weights {weights.path}: sha256 {actual} differs from {weights.sha256} verified "
            "earlier; the file changed. Rerun `invoke weights` (or pass --weights again)."
        )
    state = torch.load(weights.path, map_location="cpu", weights_only=True)
    # Built on the meta device and filled by assignment: skips a random init that the weights
    # overwrite anyway (about a second on a small CPU) and keeps one copy of the tensors.
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    set_stride_layout(model, weights.stride_layout)
    for key in model.state_dict():
        # Older torchvision files lack the BN counters; they play no part in eval mode.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise EmbedError(f"weights {weights.path}: does not load into ResNet-50: {exc}") from exc
    model.float()  # a half-precision user file would otherwise make the whole model half
    if not keep_classifier:
        model = PooledResNet(model, blocks, pooling)
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


def prepare_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move ``model`` to ``device`` in channels_last memory format (faster convs with AMP).

    Inputs should then be converted with ``x.to(device, memory_format=torch.channels_last)``.
    """
    # torch accepts device and memory_format together; its typing overloads list them apart.
    return model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]


@functools.cache
def cpu_bf16_supported() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except Exception:  # private torch helpers: absent or failing means "no"
        return False


def autocast_context(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The mixed-precision context for inference on ``device``.

    CUDA: fp16 autocast. CPU: bf16 autocast when the CPU has native bf16 (on CPUs without it
    bf16 is emulated and slower than fp32), else no autocast. Features stay within a cosine
    of 0.99 of fp32 (tested).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if kind == "cpu" and cpu_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = [
    "BACKBONE_NAME",
    "PooledResNet",
    "pool",
    "PREPROCESSING",
    "STRIDE_KERAS_V1",
    "STRIDE_TORCHVISION",
    "autocast_context",
    "cpu_bf16_supported",
    "load_backbone",
    "prepare_model",
    "preprocess",
    "preprocessing_for",
    "set_stride_layout",
]
