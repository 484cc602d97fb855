"""A child process that a GUI can poll and stop: JSON-line events, cancel by file, tree kill.

Standard library only (the Slicer module uses it before torch is installed).

:class:`ChildProcess` starts a command in a process group (session) of its own and reads its
stdout (one JSON event per line; other lines become ``{"event": "log"}``) and stderr on two
threads into a queue; :meth:`ChildProcess.poll` hands out what arrived and never blocks.

Stopping is built for a child that runs under a launcher. Inside Slicer the child is
``PythonSlicer``, CTKAppLauncher, which runs the real interpreter as *its* child and forwards
no signal: a signal ends the launcher at once and leaves the interpreter running, and on
Windows CTRL_BREAK reaches the interpreter as SIGBREAK. So :meth:`ChildProcess.cancel` first
writes the child's cancel file (a training job saves its model and reports ``cancelled``; a
segmentation job stops between two cases), waits up to ``grace_s`` seconds on a background
thread for the process to end, and only then ends every process that is left of the tree:
SIGTERM, one second, SIGKILL (Windows: ``taskkill /T /F``). Files that a killed process was
writing atomically (``.<name>.partial-<pid>-...``, see :func:`TransferSegLib.files.atomic_output`)
are removed from the ``cleanup`` folders (:func:`TransferSegLib.files.remove_stale_partials`),
so a cancel leaves nothing half-written.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from TransferSegLib import events as ev
from TransferSegLib.errors import InputError

LOG_LINES = 2000  # lines of output kept for the log tail
LINE_LIMIT = 4000  # characters kept of one line
GRACE_S = 120.0  # how long a cancelled child may take to save and stop by itself
TERM_S = 1.0  # from SIGTERM to SIGKILL
# The signals that ask a job to stop; CTRL_BREAK, which a Windows process group gets, arrives
# as SIGBREAK.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGBREAK")
                     if hasattr(signal, name))


def describe_exit(returncode: int) -> str:
    """One sentence for a child that ended with ``returncode`` without reporting why."""
    kill = getattr(signal, "SIGKILL", 9)
    if returncode in (-kill, 128 + kill):
        return ("The job was killed (SIGKILL), most likely because the computer ran out of "
                "memory; use a smaller batch size or patch, fewer cases, or a machine with more "
                "memory.")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"The job was stopped by {name}."
    return f"The job stopped with exit code {returncode} without saying why."


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child that runs this TransferSegLib: ``base`` (default: this
    process's) with the folder holding the library first on PYTHONPATH (once), unbuffered
    UTF-8 output. The one place PYTHONPATH is set for jobs and downloads."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), PYTHONUNBUFFERED="1",
               PYTHONIOENCODING="utf-8")
    return env


# ------------------------------------------------------------------------- the process tree
def _linux_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 19:
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _ps_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, "") from ``ps`` (POSIX systems without /proc)."""
    try:
        text = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True,
                              text=True, check=False, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    table = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = (int(parts[1]), "")
    return table


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time or "") of the processes this user can see."""
    if os.name == "nt":
        return {}
    return _linux_table() if os.path.isdir("/proc/self") else _ps_table()


def descendants(pid: int, table: Mapping[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """Every process below ``pid`` (children, their children, ...): pid -> start time."""
    table = process_table() if table is None else table
    children = collections.defaultdict(list)
    for child, (parent, _) in table.items():
        children[parent].append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return found


def _same_process(pid: int, started: str, table: Mapping[int, tuple[int, str]]) -> bool:
    """Whether ``pid`` still is the process that started at ``started`` (pids are reused)."""
    return pid in table and (not started or table[pid][1] == started)


# ------------------------------------------------------------------------------ the child
class ChildProcess:
    """``command`` in a process group of its own: :meth:`start`, :meth:`poll`, :meth:`cancel`.

    ``cancel_file``: written by :meth:`cancel` to ask the child to stop by itself (within
    ``grace_s`` seconds) before any signal is sent. ``cleanup``: folders whose partial files a
    killed process leaves are removed. When the child ends without reporting an error or being
    cancelled, an ``error`` event with its exit status and log tail is added.
    """

    def __init__(self, command: Sequence[str | os.PathLike], env: Mapping[str, str] | None = None,
                 cancel_file: str | os.PathLike | None = None, grace_s: float = GRACE_S,
                 cleanup: Sequence[str | os.PathLike] = ()):
        self._command = [str(part) for part in command]
        self.env = dict(env) if env is not None else None
        self.cancel_file = Path(cancel_file) if cancel_file is not None else None
        self.grace_s = float(grace_s)
        self.cleanup = [Path(folder) for folder in cleanup]
        self._events: queue.Queue[dict] = queue.Queue()
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []
        self._exited = threading.Event()  # the command itself has ended
        self._finished = threading.Event()  # ... and all its output is read
        self._cancelled = False
        self._returncode: int | None = None
        self._reported_error: str | None = None
        self._crash_error: str | None = None
        self._terminal: str | None = None
        self._tree: dict[int, str] = {}  # what the command had started when it was cancelled
        self._killed: set[int] = set()

    # -- starting
    def command(self) -> list[str]:
        return list(self._command)

    def _environment(self) -> dict[str, str] | None:
        return self.env

    def start(self) -> ChildProcess:
        """Start the child; InputError if the program cannot be started."""
        if self._process is not None:
            raise RuntimeError("This process was already started; make a new one.")
        if os.name == "nt":
            group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            group = {"start_new_session": True}
        if self.cancel_file is not None:
            with contextlib.suppress(OSError):
                self.cancel_file.unlink()  # a cancel left from an earlier run is not this one's
        try:
            self._process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=self._environment(), text=True, encoding="utf-8",
                errors="replace", bufsize=1, **group,
            )
        except OSError as error:
            raise InputError(f"Could not start the job with {self.command()[0]}: "
                             f"{error.strerror or error}; check the Python program.") from None
        self._readers = [
            threading.Thread(target=self._read, args=(self._process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    # -- reading
    def _read(self, stream, events: bool) -> None:
        for line in stream:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            event = ev.from_line(line) if events else None
            if event is None:
                with self._lock:
                    self._log.append(line[:LINE_LIMIT])
                event = ev.log(line[:LINE_LIMIT], stream="stdout" if events else "stderr")
            elif event["event"] in ev.TERMINAL:
                self._terminal = event["event"]
                if event["event"] == "error":
                    self._reported_error = str(event.get("message", ""))
            self._events.put(event)
        stream.close()

    def _watch(self) -> None:
        """Wait for the child and its output, then add the event that explains its end."""
        process = self._process
        returncode = process.wait()
        self._exited.set()
        for reader in self._readers:
            reader.join(timeout=1.0)
        if any(reader.is_alive() for reader in self._readers):
            # Something the job started still holds its output open: it is an orphan now.
            self._signal_group(None)
            for reader in self._readers:
                reader.join(timeout=5.0)
        self._returncode = returncode
        if self._cancelled:
            if self._terminal != "cancelled":
                self._events.put(ev.cancelled(returncode=returncode))
        elif returncode != 0 and self._reported_error is None:
            self._crash_error = (f"{describe_exit(returncode)}\nLast lines of its log:\n"
                                 f"{self.log_tail(20)}")
            self._events.put(ev.error(self._crash_error, returncode=returncode))
        self._finished.set()

    # -- the public state
    def poll(self) -> list[dict]:
        """The events received since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the child has ended and all its output is read."""
        return self._process is not None and not self._finished.is_set()

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it has ended (negative: killed by that signal)."""
        return self._returncode if self._finished.is_set() else None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def error(self) -> str | None:
        """What went wrong: the job's own error message, else (after a crash or a kill) its
        exit status and log tail; None while running, when done, or after :meth:`cancel`."""
        if self._reported_error is not None:
            return self._reported_error
        return self._crash_error

    def log_tail(self, lines: int = 50) -> str:
        """The last ``lines`` lines the child printed that were not events."""
        with self._lock:
            kept = list(self._log)
        return "\n".join(kept[-lines:] if lines > 0 else [])

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the end (at most ``timeout`` seconds); the exit status, or None."""
        if self._process is None:
            raise RuntimeError("The process was not started.")
        self._finished.wait(timeout)
        return self.returncode

    # -- stopping
    def cancel(self, timeout: float | None = None) -> None:
        """Ask the child to stop, and make sure it and everything it started do; returns at once.

        With a cancel file the child gets ``timeout`` seconds (default ``grace_s``) to stop by
        itself; without one it gets SIGTERM at once. What is left then is ended (SIGTERM, then
        SIGKILL), on a background thread: :meth:`running` turns False when all has ended.
        """
        if self._process is None or self._finished.is_set() or self._cancelled:
            return
        self._cancelled = True
        grace = self.grace_s if timeout is None else float(timeout)
        self._tree = descendants(self._process.pid)
        asked = False
        if self.cancel_file is not None:
            try:
                self.cancel_file.write_text("cancel\n", encoding="utf-8")
                asked = True
            except OSError:
                pass
        if not asked:
            self._signal_group(signal.SIGTERM if os.name != "nt" else signal.CTRL_BREAK_EVENT)
        threading.Thread(target=self._stop_after, args=(grace,), daemon=True).start()

    def _stop_after(self, grace: float) -> None:
        if not self._exited.wait(grace) or self._alive_tree():
            self._end_tree(signal.SIGTERM if os.name != "nt" else None)
            deadline = time.monotonic() + TERM_S
            while self._alive_tree() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._alive_tree():
                self._end_tree(None)
        self._finished.wait(10.0)
        self._remove_partial_files()

    def _alive_tree(self) -> dict[int, str]:
        """The processes of the tree that still run (the root while it is not reaped)."""
        table = process_table()
        alive = {pid: started for pid, started in self._tree.items()
                 if _same_process(pid, started, table)}
        if not self._exited.is_set():
            alive[self._process.pid] = ""
            alive.update(descendants(self._process.pid, table))
        return alive

    def _end_tree(self, sig) -> None:
        """Send ``sig`` (None: kill) to the group and to every process left of the tree."""
        alive = self._alive_tree()
        self._killed.update(alive)
        self._signal_group(sig)
        if os.name == "nt":
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL if sig is None else sig)

    def _signal_group(self, sig) -> None:
        """Send ``sig`` to the child's process group (POSIX; None: SIGKILL), or on Windows
        CTRL_BREAK (a signal) or kill the whole tree (None)."""
        if self._process is None:
            return
        if os.name == "nt":
            if sig is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)],
                               capture_output=True, check=False)
            else:
                with contextlib.suppress(OSError):
                    self._process.send_signal(signal.CTRL_BREAK_EVENT)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL if sig is None else sig)

    def _remove_partial_files(self) -> None:
        """Delete what a killed process was writing atomically in the cleanup folders."""
        if not self._killed:
            return
        from TransferSegLib.files import remove_stale_partials  # (it imports safetensors)

        for folder in self.cleanup:
            if folder.is_dir():
                for where, _, _ in os.walk(folder):
                    remove_stale_partials(where)
