"""Writing outputs so that a reader never sees half a file and nothing is overwritten by accident.

``atomic_output(path)`` yields a temporary path in the same folder (same suffix, so writers that
pick the format from the name keep working); on success the file is flushed to disk and moved
into place in one rename, on failure it is removed and the old file, if any, is untouched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from TransferSegLib.errors import OutputExistsError, TransferSegError

# Multi-part suffixes that name a format; the temporary file must end the same way.
COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz", ".tar.gz")


def full_suffix(path: str | os.PathLike) -> str:
    """The format suffix of ``path``: ``.nii.gz`` and ``.seg.nrrd`` count as one suffix."""
    name = Path(path).name.lower()
    for suffix in COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return Path(path).name[-len(suffix):]
    return Path(path).suffix


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is false."""
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(
            f"Output {path} already exists; choose another name or pass --overwrite to replace it."
        )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; move it to ``path`` in one step when the block succeeds.

    Without ``overwrite`` an existing ``path`` is refused before anything is written, and again
    at the final step (hard link, which fails if another writer got there first), so two writers
    racing for one name give one clean file and one clear error.
    """
    target = Path(path)
    refuse_existing(target, overwrite)
    if not target.parent.is_dir():
        raise TransferSegError(
            f"Cannot write {target}: folder {target.parent} does not exist; create it first."
        )
    suffix = full_suffix(target)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    tmp = target.parent / f".{stem}.partial-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise TransferSegError(f"Writing {target} produced no file.")
        _fsync_file(tmp)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise OutputExistsError(
                    f"Output {target} appeared while it was being written (another job?); "
                    "nothing was replaced. Choose another name or pass --overwrite."
                ) from None
            except OSError:
                # File systems without hard links: check, then rename (a tiny race remains).
                refuse_existing(target, overwrite)
                os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as error:
        raise TransferSegError(f"Could not write {target}: {error.strerror or error}.") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
