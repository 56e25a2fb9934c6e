"""Writing files safely: to a temporary name then renamed, and a full or read-only disk said in one sentence.

Every writer of r2d2_hpc (checkpoints, timing logs, metrics, results, shards, manifests, predicted masks) goes
through :func:`atomic_write` or :func:`disk_guard`. A write that fails for lack of space (``ENOSPC``, ``EDQUOT``,
or torch's ``unexpected pos`` from a short write) or of permission (``EACCES``, ``EPERM``, ``EROFS``) becomes a
:class:`~r2d2_hpc.errors.DiskError` that names the folder, what was being written, the space needed and free
where known, and the fix. The temporary file is removed, so a full disk is not kept full by our own leftovers,
and a file that was complete before stays complete: it is only ever replaced by a rename.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from r2d2_hpc.errors import DiskError, problem

_SPACE = "no space left on the device"
_QUOTA = "the disk quota is exceeded"
_READ_ONLY = "the file system is read-only"
_DENIED = "permission denied"
_BY_ERRNO = {
    errno.ENOSPC: _SPACE,
    errno.EDQUOT: _QUOTA,
    errno.EFBIG: "the file is larger than the file system allows",
    errno.EROFS: _READ_ONLY,
    errno.EACCES: _DENIED,
    errno.EPERM: _DENIED,
}
# Messages of libraries that do not set errno (h5py's text carries it; torch's zip writer reports a short write).
_BY_TEXT = (
    ("no space left", _SPACE),
    ("errno = 28", _SPACE),
    ("disk quota", _QUOTA),
    ("errno = 122", _QUOTA),
    ("read-only file system", _READ_ONLY),
    ("errno = 30", _READ_ONLY),
    ("permission denied", _DENIED),
    ("errno = 13", _DENIED),
    ("unexpected pos", "a short write (the file system is probably full)"),
    ("failed writing file", "a short write (the file system is probably full)"),
)


def disk_failure(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) is a full or unwritable disk, or None if it is not."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    for link in chain:  # an errno says it best (torch's short write carries the OSError as its context)
        if isinstance(link, OSError) and link.errno in _BY_ERRNO:
            return _BY_ERRNO[link.errno]
    for link in chain:
        if isinstance(link, OSError | RuntimeError):
            text = str(link).lower()
            for needle, reason in _BY_TEXT:
                if needle in text:
                    return reason
    return None


def free_bytes(folder: Path) -> int | None:
    """Free bytes for an unprivileged user on the file system that holds ``folder`` (or its nearest parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mib(num_bytes: float) -> str:
    """A size for a message: KiB below 1 MiB, MiB below 1 GiB, else GiB."""
    if num_bytes < 2**20:
        return f"{num_bytes / 2**10:.0f} KiB"
    if num_bytes < 2**30:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**30:.1f} GiB"


def disk_error(
    exc: BaseException, folder: Path, what: str, fix: str, needed_bytes: int | None = None
) -> DiskError:
    """The :class:`DiskError` for a failed write of ``what`` into ``folder`` (``exc`` must be a disk failure)."""
    reason = disk_failure(exc) or str(exc)
    space = []
    if needed_bytes:
        space.append(f"it needs about {_mib(needed_bytes)}")
    free = free_bytes(folder)
    if free is not None and reason not in (_DENIED, _READ_ONLY):
        space.append(f"{_mib(free)} free there")
    detail = f" ({', '.join(space)})" if space else ""
    if reason in (_DENIED, _READ_ONLY):
        expected = "a folder this user can write to"
        fix = f"make {folder} writable (or choose another folder), then {fix}"
    else:
        expected = "enough free space for it"
        fix = f"free space on that file system (or choose a larger one), then {fix}"
    found = f"writing {what} failed: {reason}{detail}"
    return DiskError(problem(folder, found, expected, fix))


@contextmanager
def disk_guard(folder: Path, what: str, fix: str, needed_bytes: int | None = None) -> Iterator[None]:
    """Turns a full or unwritable disk met inside the block into one :class:`DiskError` (others pass through)."""
    try:
        yield
    except DiskError:
        raise
    except (OSError, RuntimeError) as exc:
        if disk_failure(exc) is None:
            raise
        raise disk_error(exc, Path(folder), what, fix, needed_bytes) from exc


def require_free(folder: Path, needed_bytes: int, what: str, fix: str) -> None:
    """Raises :class:`DiskError` when ``folder``'s file system has less than ``needed_bytes`` free.

    For writers that cannot fail cleanly: HDF5 crashes the process (a segmentation fault in ``H5Fflush``)
    when a write meets a full disk, so shards check the space for each case before handing it to HDF5.
    """
    free = free_bytes(folder)
    if free is None or free >= needed_bytes:
        return
    found = f"writing {what} would not fit: it needs about {_mib(needed_bytes)}, {_mib(free)} free there"
    fix = f"free space on that file system (or choose a larger one), then {fix}"
    raise DiskError(problem(folder, found, "enough free space for it", fix))


def temporary_name(path: Path) -> Path:
    """``.tmp-<pid>-<name>``: hidden, beside the target, with the target's suffix (nibabel picks formats by it)."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextmanager
def atomic_write(
    path: Path,
    what: str,
    fix: str = "run the same command again",
    needed_bytes: int | None = None,
    tmp: Path | None = None,
    before_rename: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s new content to; renames it over ``path`` when the block ends.

    The temporary file is fsynced before the rename and the folder after it. If the block (or the rename) fails,
    the temporary file is removed and ``path`` is untouched; a full or unwritable disk raises a
    :class:`DiskError` naming the folder, ``what``, ``needed_bytes`` and the free space, and ``fix``.

    Args:
        tmp: the temporary name (default :func:`temporary_name`).
        before_rename: called after the fsync, just before the rename (e.g. keep the old file as a backup).
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temporary_name(path)
    with disk_guard(path.parent, what, fix, needed_bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if before_rename is not None:
                before_rename()
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str, what: str, fix: str = "run the same command again") -> Path:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    path = Path(path)
    with atomic_write(path, what, fix, needed_bytes=len(text.encode())) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(
    path: Path, content: Any, what: str, fix: str = "run the same command again", **dumps: Any
) -> Path:
    """Writes ``json.dumps(content, **dumps)`` to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(content, **dumps), what, fix)


def check_writable(folder: Path, what: str, fix: str = "run the same command again") -> None:
    """Creates ``folder`` and writes a probe file there, before any compute starts; raises :class:`DiskError`."""
    folder = Path(folder)
    probe = folder / f".r2d2-write-test-{os.getpid()}"
    with disk_guard(folder, f"a test file into {what}", fix):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as fh:
                fh.write(b"r2d2")
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            probe.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (a no-op where directories cannot be opened or fsynced)."""
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
