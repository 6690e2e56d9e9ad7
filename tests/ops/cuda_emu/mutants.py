"""Helpers for the tests that break a kernel on purpose: ``mutated`` makes the build overrides of a broken
variant (the sources on disk never change), and ``run_isolated`` runs a call in a forked child, since a
broken kernel may also read out of bounds, crash or hang.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Any

from .emulator import Call, Emulator
from .sources import ROOT, read


def mutated(path: str, old: str, new: str, occurrence: int | None = None) -> dict[str, str]:
    """``build`` overrides replacing ``old`` by ``new`` in ``path``: every occurrence, or only the given one
    (0-based). Fails when ``old`` is not there, so a mutation that no longer applies is noticed."""
    text = read(path)
    count = text.count(old)
    if count == 0 or (occurrence is not None and occurrence >= count):
        raise ValueError(f"{os.path.relpath(path, ROOT)}: {old!r} occurs {count} time(s); the mutation no longer "
                         "applies, update it to the current source")
    if occurrence is None:
        return {path: text.replace(old, new)}
    at = -1
    for _ in range(occurrence + 1):
        at = text.index(old, at + 1)
    return {path: text[:at] + new + text[at + len(old):]}


@dataclass
class Outcome:
    """How an isolated call ended: "ok" (``result``), "error" (the emulator reported one: ``detail``),
    "crash" (a signal) or "timeout"."""
    status: str
    detail: str = ""
    result: Any = None


def run_isolated(emu: Emulator, call: Call, timeout: float = 30.0) -> Outcome:
    """Runs ``call`` in a forked child, so that a kernel that reads or writes out of bounds, or loops, cannot
    take the test process with it; its outputs come back through a pipe. The child runs only the launch
    (the emulator and ctypes, no torch), then leaves with os._exit."""
    r, w = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about forking with threads (torch's pool): the
        warnings.simplefilter("ignore", DeprecationWarning)  # child uses none of them, only ctypes
        pid = os.fork()
    if pid == 0:  # child: never returns
        status = 1
        try:
            import faulthandler
            faulthandler.disable()  # a crash is an expected outcome here, not worth a traceback
            os.close(r)
            code = call.launch()
            blobs = [ctypes.string_at(t.data_ptr(), t.untyped_storage().nbytes()) for t in call.outputs]
            view = memoryview(pickle.dumps((code, emu.message() if code else "", blobs)))
            while view:
                view = view[os.write(w, view):]
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    chunks, deadline, timed_out = [], time.monotonic() + timeout, False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return Outcome("timeout", f"no result within {timeout:.0f} s")
    if os.WIFSIGNALED(status):
        return Outcome("crash", f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}")
    if not chunks:
        return Outcome("crash", f"the child exited with status {os.WEXITSTATUS(status)} before reporting")
    code, message, blobs = pickle.loads(b"".join(chunks))
    if code != 0:
        return Outcome("error", f"{code}: {message}")
    for t, blob in zip(call.outputs, blobs):
        ctypes.memmove(t.data_ptr(), blob, len(blob))
    return Outcome("ok", result=call.finish())
