"""Writing outputs so that a reader never sees half a file and nothing is overwritten by accident.

``atomic_output(path)`` yields a temporary path in the same folder (same suffix, so writers that
pick the format from the name keep working); on success the file is flushed to disk and moved
into place in one rename, on failure it is removed and the old file, if any, is untouched.
A process killed while writing (SIGKILL, power loss) leaves its hidden temporary file
(``.<name>.partial-<pid>-<hex>``) and never a half-written output; ``remove_stale_partials``
deletes such leftovers of dead processes (training does it when it takes its output folder).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from TransferSegLib.errors import InputError, OutputExistsError, TransferSegError

# Multi-part suffixes that name a format; the temporary file must end the same way.
COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz", ".tar.gz")
# What writers raise when a write fails: OSError (Python), RuntimeError (ITK, torch),
# SafetensorError (safetensors, which reports the OS error only in its text).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
_FULL_WORDS = re.compile(r"no space left|file too large|quota|os error (28|27|122)\b", re.I)
# A temporary output of atomic_output: .<name>.partial-<pid>-<8 hex digits><suffix>
_PARTIAL = re.compile(r"^\..*\.partial-(\d+)-[0-9a-f]{8}(\.[^/]*)?$")


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


def require_regular(path: str | os.PathLike, what: str = "Input", folder_ok: bool = False
                    ) -> Path:
    """``path`` if it is a regular file (or, with ``folder_ok``, a folder); a named pipe, a
    device or a socket would hang or fail mid-read, so it is refused before it is opened.
    A missing path is left to the caller's own message."""
    path = Path(path)
    if path.exists() and not path.is_file() and not (folder_ok and path.is_dir()):
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe, device or socket)"
        raise InputError(f"{what} {path} is {kind}; give a file.")
    return path


@contextlib.contextmanager
def library_messages_held() -> Iterator[list[str]]:
    """Hold what C libraries print on the process's stderr (ITK's ``** ERROR: ...`` lines on a
    full disk) while the block runs; the list gets the text. A failure then reaches the user
    as TransferSeg's one sentence; the held text is printed again only if the block succeeds
    (so a warning on success is not lost)."""
    held: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (some embedded interpreters)
        yield held
        return
    import tempfile

    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield held
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held.append(sink.read().decode("utf-8", "replace"))
            if not failed and held[0]:
                os.write(2, held[0].encode("utf-8"))


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal after resolving links, or the same inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def refuse_inputs_as_outputs(inputs: list, files: list, folders: list = ()) -> None:
    """Raise :class:`InputError` before any work if an output would replace an input.

    ``files`` are output files, ``folders`` output folders (replaced as a whole with
    --overwrite); ``inputs`` are the paths a command reads. No output file may be an input or
    another output; no output folder may be, or hold, an input. Empty entries are skipped."""
    inputs = [Path(p) for p in inputs if p and os.path.lexists(p)]  # ids are not files
    outputs = [Path(p) for p in files if p]
    for index, output in enumerate(outputs):
        for source in inputs:
            if _same(output, source):
                raise InputError(f"Output {output} is the input {source}; writing it would "
                                 "destroy the input: choose another output name.")
        for other in outputs[index + 1:]:
            if _same(output, other):
                raise InputError(f"Two outputs are the same file ({output} and {other}); "
                                 "give each its own name.")
    for folder in (Path(p) for p in folders if p):
        resolved = folder.resolve()
        for source in inputs:
            inside = source.resolve()
            if inside == resolved or resolved in inside.parents or _same(folder, source):
                raise InputError(f"Output folder {folder} holds the input {source}; writing "
                                 "there could replace it: choose another output folder.")
        for output in outputs:
            if resolved in output.resolve().parents or output.resolve() == resolved:
                raise InputError(f"Output {output} is inside the output folder {folder}; "
                                 "give it a place of its own.")


def require_writable(files: list, folders: list = ()) -> None:
    """Raise :class:`InputError` before any work if an output cannot be written where it is
    asked for: for an output file its folder, for an output folder the folder itself or, where
    it does not exist yet, the nearest folder above it that does. Writing is tried for real (an
    empty hidden file made and removed at once): permission bits say nothing for root, and
    read-only or special file systems (``/sys``, a read-only mount) only answer a write. (A
    full disk still takes an empty file; the writers report it when they fail.) Empty entries
    are skipped."""
    places = [Path(p).parent for p in files if p] + [Path(p) for p in folders if p]
    for place in places:
        existing = place
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise InputError(f"Cannot write into {place}: {existing} is a file, not a folder; "
                             "choose another output.")
        try:
            fd, probe = tempfile.mkstemp(prefix=".transferseg-write-check-", dir=existing)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise InputError(f"Cannot write into {existing} ({reason}): choose an output in a "
                             "folder you may write to.") from None
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


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


def write_error(target: str | os.PathLike, error: BaseException,
                temporary: str | os.PathLike | None = None) -> TransferSegError:
    """The error to raise when writing ``target`` (through ``temporary``) failed with ``error``:
    a full disk or a file size limit is named as such, with what to do."""
    if isinstance(error, OSError) and error.strerror:
        detail = error.strerror
    else:  # ITK: "... ITK ERROR: NrrdImageIO(0x55..): Write: Error writing <file>: ..."
        detail = " ".join(str(error).split()).split("ITK ERROR:")[-1]
        detail = re.sub(r"^\s*\w+\(0x[0-9a-f]+\):\s*", "", detail)[:240] or type(error).__name__
    if temporary is not None:
        detail = detail.replace(str(temporary), str(target))
    if getattr(error, "errno", None) in _FULL_ERRNOS or _FULL_WORDS.search(str(error)):
        return TransferSegError(
            f"Could not write {target}: the disk is full or the file is too large for it "
            f"({detail}); free space or choose another folder. Nothing was replaced."
        )
    return TransferSegError(
        f"Could not write {target} ({detail}); check that the disk has free space and that "
        "you may write to that folder, or choose another folder. Nothing was replaced."
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this computer (True when unsure)."""
    if pid <= 0 or os.name == "nt":  # on Windows signal 0 is CTRL_C_EVENT: never send it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours, or there is no way to ask
        return True
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_output` left in ``folder`` when its process
    was killed (their process no longer exists); returns them. Files of live writers stay."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _PARTIAL.match(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not pid_alive(
                    int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


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
    except WRITE_ERRORS as error:
        raise write_error(target, error, tmp) from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class OutputLock:
    """An exclusive claim on an output folder, so two jobs never write into the same one.

    The lock file holds the owner's process id and computer name. A lock left by a process
    that no longer exists on this computer (killed, crashed) is taken over; its id is then in
    ``stale_pid``.
    """

    def __init__(self, folder: Path):
        self.path = folder / ".transferseg.lock"
        self.stale_pid: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if not self._take_over_stale():
                    raise TransferSegError(
                        f"Another TransferSeg job is writing to {self.path.parent} (if none "
                        f"is, delete {self.path.name} there); choose another output folder."
                    ) from None
        else:
            raise TransferSegError(f"Another TransferSeg job took {self.path.parent} just now; "
                                   "choose another output folder.")
        os.write(fd, f"{os.getpid()}\n{socket.gethostname()}\n".encode())
        os.close(fd)
        return self

    def _take_over_stale(self) -> bool:
        """Remove the lock if its process is gone; False if it is (or may be) alive."""
        try:
            text = self.path.read_text(errors="replace", encoding="utf-8")
        except FileNotFoundError:
            return True  # released meanwhile: try again
        except OSError:
            return False
        fields = text.split()
        if not fields or not fields[0].isdigit():
            return False
        if len(fields) > 1 and fields[1] != socket.gethostname():
            return False  # a process on another computer: no way to tell
        pid = int(fields[0])
        if pid_alive(pid):
            return False
        # Move it aside first: of two jobs taking over at once only one can, and a live lock
        # written meanwhile by the other is put back.
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        if aside.read_text(errors="replace", encoding="utf-8") != text:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        self.stale_pid = pid
        return True

    def __exit__(self, *_: object) -> None:
        self.path.unlink(missing_ok=True)

