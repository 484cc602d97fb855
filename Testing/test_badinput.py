"""Every case of the bad-input corpus (``badinput.py``) ends in its clear error or recovery.

Each case runs in a forked child process, so that a hang is killed at the time limit and fails
the test instead of blocking the suite, a crash (segfault, abort) fails it instead of taking
pytest down, and cases that declare huge sizes run under an address-space cap while their
resident memory growth is measured.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from badinput import CASES, COVERED_ELSEWHERE, BadCase

import TransferSegLib.cli  # noqa: F401 - imported before forking, so children start warm
import TransferSegLib.inference  # noqa: F401
import TransferSegLib.training  # noqa: F401
from TransferSegLib.errors import TransferSegError

TIME_LIMIT_S = 10.0
# A huge case may grow resident memory by this much at most; the address-space cap above the
# child's size at the fork stops a real blow-up long before it could hurt the machine.
HUGE_GROWTH_LIMIT_MB = 200
HUGE_ADDRESS_SPACE_MB = 3072
FORKING = hasattr(os, "fork") and sys.platform.startswith("linux")


def _virtual_memory_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _max_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def _outcome(bad: BadCase, call) -> dict:
    """Run ``call`` and describe what happened (in the child)."""
    start_rss, start = _max_rss_mb(), time.perf_counter()
    result: dict = {"raised": None}
    try:
        value = call()
        if bad.recovery is not None:
            try:
                bad.recovery(value)
            except AssertionError as error:
                result["recovery_failed"] = str(error) or traceback.format_exc(limit=3)
        if bad.cli:
            result["cli"] = list(value)
    except BaseException as error:  # noqa: BLE001 - anything escaping is what we report
        result["raised"] = f"{type(error).__module__}.{type(error).__qualname__}"
        result["transferseg"] = isinstance(error, TransferSegError)
        result["type_ok"] = bad.error is not None and isinstance(error, bad.error)
        result["message"] = str(error)
        result["traceback"] = traceback.format_exc(limit=8)
    result["seconds"] = time.perf_counter() - start
    result["rss_growth_mb"] = _max_rss_mb() - start_rss
    return result


def run_isolated(bad: BadCase, folder: Path, limit_s: float = TIME_LIMIT_S) -> dict:
    """Make the case's input, then run its call in a child killed after ``limit_s``; the
    outcome as a dict."""
    call = bad.make(folder)
    if not FORKING:  # no fork: run here and only check the time afterwards
        return {**_outcome(bad, call), "output": ""}
    result_path = folder.parent / f"{bad.name}.outcome.json"
    output_path = folder.parent / f"{bad.name}.output.txt"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            with open(output_path, "wb") as output:  # C-level prints (ITK, teem) land here
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
            # Fresh threads per filter instead of the parent's pools, which a fork leaves
            # behind; one torch thread keeps OpenMP out of it.
            sitk.ProcessObject.SetGlobalDefaultThreader("PLATFORM")
            torch.set_num_threads(1)
            if bad.huge:
                cap = _virtual_memory_bytes() + HUGE_ADDRESS_SPACE_MB * 2**20
                resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(
                    resource.RLIMIT_AS)[1]))
            result = _outcome(bad, call)
            with tempfile.NamedTemporaryFile("w", dir=folder.parent, delete=False) as handle:
                json.dump(result, handle)
            os.replace(handle.name, result_path)
        except BaseException:  # noqa: BLE001 - the child must reach os._exit
            code = 70
        finally:
            os._exit(code)
    deadline = time.monotonic() + limit_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{bad.name}: no outcome after {limit_s:.0f} s (a hang)",
                        pytrace=False)
        time.sleep(0.005)
    output = output_path.read_text(errors="replace") if output_path.exists() else ""
    if os.WIFSIGNALED(status):
        pytest.fail(f"{bad.name}: the reader crashed with signal {os.WTERMSIG(status)}\n"
                    f"{output}", pytrace=False)
    if not result_path.exists():
        pytest.fail(f"{bad.name}: the child ended ({status}) without an outcome\n{output}",
                    pytrace=False)
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["output"] = output
    return result


@pytest.mark.parametrize("bad", CASES, ids=[bad.name for bad in CASES])
def test_bad_input_ends_in_its_clear_error_or_recovery(bad: BadCase, tmp_path):
    folder = tmp_path / bad.name
    folder.mkdir()
    result = run_isolated(bad, folder)
    assert result["seconds"] < TIME_LIMIT_S
    if bad.huge:
        assert result["rss_growth_mb"] < HUGE_GROWTH_LIMIT_MB, result
    if bad.cli:
        assert result["raised"] is None, result.get("traceback")
        code, _, err = result["cli"]
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(bad.match, lines[0]), (bad.match, lines[0])
        assert "Traceback" not in err + result["output"]
    elif bad.error is not None:
        assert result["raised"] is not None, f"{bad.name}: no error was raised"
        assert result["type_ok"], f"expected {bad.error.__name__}:\n{result['traceback']}"
        assert re.search(bad.match, result["message"]), (bad.match, result["message"])
        assert "\n" not in result["message"], result["message"]  # one line for the CLI
    else:
        assert result["raised"] is None, result["traceback"]
        assert "recovery_failed" not in result, result["recovery_failed"]


def test_the_corpus_is_large_varied_and_documented():
    names = [bad.name for bad in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 35
    areas = {bad.area for bad in CASES}
    assert areas == {"volumes", "segmentations", "label maps", "datasets", "model files",
                     "importers", "export", "cli"}
    assert sum(bad.huge for bad in CASES) >= 5
    for bad in CASES:
        assert bad.input and (bad.cli or bad.error or bad.outcome), bad.name
    root = Path(__file__).parent
    for reference in COVERED_ELSEWHERE.values():
        file, test = reference.split("::")
        assert f"def {test}(" in (root.parent / file).read_text(encoding="utf-8"), reference


def test_a_hang_or_a_crash_fails_instead_of_blocking(tmp_path):
    """The harness itself: a case that sleeps past the limit, or segfaults, must fail."""
    if not FORKING:
        pytest.skip("cases run in this process where there is no fork (not Linux)")
    import ctypes

    def make_hang(folder):
        return lambda: time.sleep(60)

    def make_crash(folder):
        return lambda: ctypes.string_at(0)

    for name, make in (("hang", make_hang), ("crash", make_crash)):
        bad = BadCase(name, "volumes", name, make, error=TransferSegError)
        (tmp_path / name).mkdir()
        start = time.monotonic()
        with pytest.raises(pytest.fail.Exception, match="a hang|crashed with signal"):
            run_isolated(bad, tmp_path / name, limit_s=1.0)
        assert time.monotonic() - start < 5
