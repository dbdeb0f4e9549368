"""Crash-safe file writing and content hashes.

A file that another stage reads is written under a temporary name in the same folder, flushed
to disk and renamed over the target: a reader sees the old file or the new one, never half of
one, whatever happens to the writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None], *, durable: bool = False) -> Path:
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`.

    `durable=True` also fsyncs the file and its folder (for stores that must survive a power
    loss, not only a killed process). The temporary file is removed when `write` raises.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str, *, durable: bool = False) -> Path:
    """`text` (UTF-8) to `path`, atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), durable=durable)


def atomic_write_json(path: Path | str, obj, *, indent: int | None = 2, durable: bool = False) -> Path:
    """`obj` as JSON to `path`, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent), durable=durable)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
