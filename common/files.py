"""Crash-safe file writing, whole folders swapped in, write failures as errors, content hashes.

A file that another stage reads is written under a temporary name in the same folder, flushed
to disk and renamed over the target: a reader sees the old file or the new one, never half of
one, whatever happens to the writer. A folder of files (a run's stage) is written whole beside
the old one and swapped in by `replace_dir`. A write that fails (a read-only or full disk)
becomes a `WriteError` naming the path (`reporting_write_errors`), which the commands print
without a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from common.errors import LesionfuseError

__all__ = [
    "WriteError",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "replace_dir",
    "reporting_write_errors",
    "restore_dir",
    "sha256_file",
]

log = logging.getLogger(__name__)


class WriteError(LesionfuseError):
    """A file or folder could not be written (read-only, full, or missing folder; no permission)."""


# What to do about the usual reasons a write fails, by errno.
_ADVICE = {
    errno.ENOSPC: "free some space there, or move the artifacts with "
    "LESIONFUSE_ARTIFACTS=/other/disk",
    errno.EDQUOT: "free some space there (the disk quota is full), or move the artifacts with "
    "LESIONFUSE_ARTIFACTS=/other/disk",
    errno.EROFS: "the file system is mounted read-only: move the artifacts with "
    "LESIONFUSE_ARTIFACTS=/writable/folder (or --run / --store / --out elsewhere)",
    errno.EACCES: "make the folder writable for this user, or move the artifacts with "
    "LESIONFUSE_ARTIFACTS=/writable/folder",
    errno.EPERM: "make the folder writable for this user, or move the artifacts with "
    "LESIONFUSE_ARTIFACTS=/writable/folder",
}
_GENERAL_ADVICE = "check that the folder exists and can be written, then run the command again"


def _write_error_message(what: str, error: OSError, path: Path | str | None = None) -> str:
    """'<what>: cannot write <path>: <reason> (<ERRNO>); <what to do>' for an OSError."""
    where = error.filename if error.filename is not None else path
    code = errno.errorcode.get(error.errno, "") if error.errno is not None else ""
    reason = error.strerror or str(error) or type(error).__name__
    advice = (
        _ADVICE.get(error.errno, _GENERAL_ADVICE) if error.errno is not None else _GENERAL_ADVICE
    )
    return f"{what}: cannot write {where}: {reason}{f' ({code})' if code else ''}; {advice}"


@contextlib.contextmanager
def reporting_write_errors(what: str, path: Path | str | None = None) -> Iterator[None]:
    """Turn an OSError raised inside the block into a WriteError naming the path and the fix.

    `what` names the command or stage ("train-gbdt"), `path` the folder being written (used when
    the OSError names no file). Wrap the writing part of a stage in it, at its public boundary.

    Raises:
        WriteError: from any OSError of the block.
    """
    try:
        yield
    except OSError as error:
        raise WriteError(_write_error_message(what, error, path)) from error


def atomic_write(
    path: Path | str, write: Callable[[BinaryIO], object], *, durable: bool = False
) -> Path:
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`.

    What `write` returns is ignored (`f.write` returns the byte count).

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


def atomic_write_json(
    path: Path | str, obj, *, indent: int | None = 2, durable: bool = False
) -> Path:
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


# renameat2(2) flag: swap two paths in one atomic step (Linux >= 3.15, glibc >= 2.28).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically; False where the system or file system cannot (then nothing
    moved)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(new: Path | str, target: Path | str) -> Path:
    """Swap the complete folder `new` in as `target`, then delete the old `target`.

    A reader sees the old folder or the new one, never a mix: where the kernel can, the two are
    exchanged in one step (renameat2 RENAME_EXCHANGE); elsewhere the old folder is first renamed
    to `<target>.old-<pid>` (which `restore_dir` puts back should the process die in between).
    The old folder's files are removed only once the new one is in place.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old folder
    else:
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old)
    fsync_dir(target.parent)
    return target


def restore_dir(target: Path | str) -> Path:
    """Put back `<target>.old-<pid>` when a swap by `replace_dir` died between its two renames."""
    target = Path(target)
    if not target.exists():
        olds = sorted(target.parent.glob(f"{target.name}.old-*"))
        if olds:
            log.warning("%s: restoring it from %s (a swap was interrupted)", target, olds[-1])
            os.rename(olds[-1], target)
    return target


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
