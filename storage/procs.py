"""Process helpers for the layers above (storage is the one package every other may import).

A subprocess PrefLoop starts (vLLM, a round's trainer) must not outlive the process that started
it: a SIGKILL, the OOM killer or a lost terminal would otherwise leave it holding its port, its
memory and the GPU for the next start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``preexec_fn`` of a Popen, or the
    first call of a worker). Linux ties this to the parent *thread*: start such children from a
    thread that lives as long as the app (the main thread, or a watchdog that runs until exit)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the pid file below still reaps orphans at the next start
        pass


def child_setup(niceness: int = 0):
    """A ``preexec_fn``: die with the parent, and lower the child's CPU priority by ``niceness``
    (on a few shared cores, the app's short requests then get the CPU first)."""

    def setup() -> None:
        die_with_parent()
        if niceness:
            os.nice(niceness)

    return setup


def write_pid_file(path: Path, pid: int, marker: str) -> None:
    """Remember a process group we lead (``pid``) and a string its command line contains."""
    Path(path).write_text(f"{pid}\n{marker}\n")


def reap_pid_file(path: Path, grace_s: float = 10.0) -> int | None:
    """Kill the process group a previous run left behind, if it is still there and still ours
    (its leader's command line holds the marker: a reused pid is left alone). Returns the pid
    killed, or None. The file is removed either way."""
    path = Path(path)
    try:
        pid_text, marker = path.read_text().splitlines()[:2]
        pid = int(pid_text)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    path.unlink(missing_ok=True)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if marker not in cmdline:  # the pid now belongs to another program
            return None
    except OSError:
        # The leader is gone. Members left in its group (a helper it started) are ours: Linux does
        # not give a pid to a new process while it is still some group's id.
        if not _group_alive(pid):
            return None
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return pid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return pid
            time.sleep(0.2)
    return pid


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies waiting to be reaped are not)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False
