"""Converting the Keras ResNet50 TF.js package into a torchvision ResNet-50 state dict.

Local, numpy + torch only: `read_tfjs_weights` reads the tensors of a TF.js layers model,
`convert_tfjs_resnet50` maps them onto torchvision's keys with Keras' 'caffe' input, its conv
biases and its BatchNorm epsilon folded in, so that the model takes torchvision-normalised RGB
(`embed.resnet50.INPUT_MEAN` / `INPUT_STD`). `embed.weights` runs it once and caches the result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from embed.errors import EmbedError
from embed.resnet50 import INPUT_MEAN, INPUT_STD, resnet50_shapes

__all__ = [
    "CAFFE_MEAN_BGR",
    "convert_tfjs_resnet50",
    "read_tfjs_weights",
]


# Keras 'caffe' preprocessing: BGR, 0..255, minus these per-channel means (BGR order).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_KERAS_BN_EPS = 1e-3
_TORCH_BN_EPS = 1e-5

_STAGE_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}


def _model_json(package_dir: Path) -> Path:
    for candidate in (package_dir / "model.json", package_dir / "ResNet50" / "model.json"):
        if candidate.is_file():
            return candidate
    raise EmbedError(f"package_dir: no model.json in {package_dir} or {package_dir / 'ResNet50'}")


def read_tfjs_weights(model_json: Path) -> dict[str, np.ndarray]:
    """Read every tensor of a TF.js layers model's ``weightsManifest``.

    Tensors are stored back to back, in manifest order, across each group's shard files
    (little-endian float32, unquantised). Returns name -> float32 array of the listed shape.
    Raises EmbedError for a quantised or non-float32 tensor, a shard path that is not a plain
    file name beside ``model_json``, or shards holding more or fewer values than listed.
    """
    try:
        manifest = json.loads(model_json.read_text())["weightsManifest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EmbedError(
            f"{model_json}: not a TF.js model.json with a weightsManifest ({exc})"
        ) from exc
    tensors: dict[str, np.ndarray] = {}
    for group in manifest:
        paths = group["paths"]
        for name in paths:
            # The manifest is data from the package: never let it point outside its folder.
            if Path(name).name != name or name in ("", ".", ".."):
                raise EmbedError(f"{model_json}: shard path {name!r} is not a plain file name")
        files = [model_json.parent / name for name in paths]
        for file in files:
            if not file.is_file():
                raise EmbedError(f"{model_json}: shard {file} is missing")
        sizes = [file.stat().st_size for file in files]
        buffer = bytearray(sum(sizes))
        view = memoryview(buffer)
        offset = 0
        for file, size in zip(files, sizes, strict=True):
            with open(file, "rb") as handle:
                if handle.readinto(view[offset : offset + size]) != size:
                    raise EmbedError(f"{file}: short read")
            offset += size
        if len(buffer) % 4:
            raise EmbedError(
                f"{model_json}: shards of group {paths[:1]} hold {len(buffer)} bytes, not float32s"
            )
        values = np.frombuffer(buffer, dtype="<f4")
        position = 0
        for spec in group["weights"]:
            name, shape = spec["name"], [int(d) for d in spec["shape"]]
            if "quantization" in spec or spec.get("dtype", "float32") != "float32":
                raise EmbedError(
                    f"{model_json}: tensor {name} is {spec.get('dtype')} "
                    f"{'quantised' if 'quantization' in spec else ''}; only float32 is supported"
                )
            count = math.prod(shape)
            if position + count > values.size:
                raise EmbedError(
                    f"{model_json}: manifest lists more values than the shards hold "
                    f"(at tensor {name}, {values.size} values in the shards)"
                )
            tensors[name] = values[position : position + count].reshape(shape)
            position += count
        if position != values.size:
            raise EmbedError(
                f"{model_json}: shards hold {values.size} values but the manifest lists {position}"
            )
    return tensors


def _keras_names() -> list[str]:
    names = ["conv1/kernel", "conv1/bias"] + [f"bn_conv1/{p}" for p in _BN_PARAMS]
    for stage, blocks in _STAGE_BLOCKS.items():
        for letter in "abcdef"[:blocks]:
            branches = ["2a", "2b", "2c"] + (["1"] if letter == "a" else [])
            for branch in branches:
                names += [f"res{stage}{letter}_branch{branch}/kernel"]
                names += [f"res{stage}{letter}_branch{branch}/bias"]
                names += [f"bn{stage}{letter}_branch{branch}/{p}" for p in _BN_PARAMS]
    return names + ["fc1000/kernel", "fc1000/bias"]


_BN_PARAMS = ("gamma", "beta", "moving_mean", "moving_variance")


def convert_tfjs_resnet50(package_dir: Path) -> dict[str, torch.Tensor]:
    """Convert the Keras ResNet50 TF.js package into a torchvision ResNet-50 state dict.

    ``package_dir`` holds ``model.json`` and its shards, directly or in ``ResNet50/`` (the npm
    package layout). Returns a plain dict of float32 tensors with torchvision's keys, including
    ``fc.weight`` (1000, 2048) and ``fc.bias``. The model it describes needs the Keras v1 stride
    layout (``embed.backbone.load_backbone`` sets it) and takes torchvision's standard input:
    RGB in 0..1 normalised by ``INPUT_MEAN``/``INPUT_STD``.

    Raises EmbedError when the package lacks (or adds) any expected tensor.
    """
    raw = read_tfjs_weights(_model_json(Path(package_dir)))
    expected = _keras_names()
    missing = [name for name in expected if name not in raw]
    extra = sorted(set(raw) - set(expected))
    if missing or extra:
        raise EmbedError(
            f"package_dir {package_dir}: not the Keras ResNet50 layout: "
            f"missing tensors ({len(missing)}): {', '.join(missing[:5])}; "
            f"unexpected tensors ({len(extra)}): {', '.join(extra[:5])}"
        )
    w = {name: raw[name].astype(np.float64) for name in expected}
    state: dict[str, torch.Tensor] = {}

    # conv1 with Keras' 'caffe' input folded in. Keras sees x_caffe[bgr(c)] =
    # 255 * (std[c] * x[c] + mean[c]) - caffe_mean[bgr(c)] for torchvision-normalised RGB x, so
    # conv1(x_caffe) = conv(x, W[:, :, bgr(c)] * 255 * std[c]) + sum_k W * (255*mean - caffe_mean).
    # The constant goes into bn1's running mean with conv1's bias. It is exact away from the image
    # border only: Keras zero-pads x_caffe while torch zero-pads x, i.e. pads with the torchvision
    # mean colour, which is within 0.5 grey level of the caffe mean. Measured against an unfolded
    # Keras-style reference on the imagenet-check photos: pooled features agree to a cosine of
    # 1 - 1.2e-6 or better (224 and 96 px) and top-1 probabilities to 5e-4.
    # The 255 is then divided out of conv1 and bn1 (mean / 255, var / 255^2 with the eps shift),
    # which is exact and keeps bn1's running_var near 1 instead of up to 8e4, beyond float16's
    # range: the state dict survives a cast to half precision.
    kernel = w["conv1/kernel"][:, :, ::-1, :]  # BGR -> RGB input channels
    std = np.asarray(INPUT_STD)
    mean = np.asarray(INPUT_MEAN)
    caffe_mean_rgb = np.asarray(CAFFE_MEAN_BGR)[::-1]
    constant = np.einsum("hwco,c->o", kernel, 255.0 * mean - caffe_mean_rgb)
    state["conv1.weight"] = _conv_weight(kernel * std[None, None, :, None])
    _put_bn(state, "bn1", w, "bn_conv1", w["conv1/bias"] + constant, scale=255.0)

    for stage, blocks in _STAGE_BLOCKS.items():
        for index, letter in enumerate("abcdef"[:blocks]):
            prefix = f"layer{stage - 1}.{index}"
            for branch, slot in (("2a", 1), ("2b", 2), ("2c", 3)):
                keras = f"res{stage}{letter}_branch{branch}"
                state[f"{prefix}.conv{slot}.weight"] = _conv_weight(w[f"{keras}/kernel"])
                _put_bn(
                    state,
                    f"{prefix}.bn{slot}",
                    w,
                    f"bn{stage}{letter}_branch{branch}",
                    w[f"{keras}/bias"],
                )
            if letter == "a":
                keras = f"res{stage}a_branch1"
                state[f"{prefix}.downsample.0.weight"] = _conv_weight(w[f"{keras}/kernel"])
                _put_bn(
                    state, f"{prefix}.downsample.1", w, f"bn{stage}a_branch1", w[f"{keras}/bias"]
                )

    state["fc.weight"] = _tensor(w["fc1000/kernel"].T)
    state["fc.bias"] = _tensor(w["fc1000/bias"])
    return {key: state[key] for key in resnet50_shapes() if key in state}


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _conv_weight(kernel: np.ndarray) -> torch.Tensor:
    # TF.js/Keras kernels are (kh, kw, in, out); torch wants (out, in, kh, kw).
    return _tensor(kernel.transpose(3, 2, 0, 1))


def _put_bn(
    state: dict[str, torch.Tensor],
    prefix: str,
    w: dict[str, np.ndarray],
    keras: str,
    conv_bias: np.ndarray,
    scale: float = 1.0,
) -> None:
    # BN(conv(x) + b) with mean m equals BN(conv(x)) with mean m - b: torchvision's convs have
    # no bias, so the bias moves into the running mean. Keras divides by sqrt(var + 1e-3), torch
    # by sqrt(var + 1e-5): var' = var + 1e-3 - 1e-5 makes them equal. When the preceding conv's
    # weights were divided by `scale`, mean and sqrt(var + eps) are divided by it too.
    state[f"{prefix}.weight"] = _tensor(w[f"{keras}/gamma"])
    state[f"{prefix}.bias"] = _tensor(w[f"{keras}/beta"])
    state[f"{prefix}.running_mean"] = _tensor((w[f"{keras}/moving_mean"] - conv_bias) / scale)
    state[f"{prefix}.running_var"] = _tensor(
        (w[f"{keras}/moving_variance"] + _KERAS_BN_EPS) / scale**2 - _TORCH_BN_EPS
    )
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
