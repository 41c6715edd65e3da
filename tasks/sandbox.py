"""Running model-generated programs: each in its own process, directory and limits.

Where this process is root and `unshare` works (Linux containers and CI here), every program runs
inside fresh network, mount, PID and IPC namespaces (tasks/sandbox_runner.py): no network at all,
every mount of the machine read-only, so the only writable places are its own empty /tmp, /var/tmp
and /dev/shm (tmpfs, 64 MiB each, gone with it), a proc of its own that shows no process of the
machine, System V IPC that dies with it, an unprivileged uid of its own (one per worker slot, so a
fork bomb meets RLIMIT_NPROC), CPU-time, address-space, file-size and process limits, and on
timeout the whole namespace dies with it.

Elsewhere (not root, no namespaces) the fallback is weaker and says so in `isolation()`: a new
session killed as a group, the same resource limits (the process limit then counts all of the
user's processes), a fresh temporary directory as cwd, and no isolation of network, files, IPC or
processes.

The verdict rests on no secret: a program passes only if the runner's own last line, reached after
the program ran to its end, sends a message with a file descriptor attached over a socket, and the
judge (the runner, or this module in the fallback) takes it only from the program's pid, as the
kernel reports it. Printing anything, writing to any descriptor, `sys.exit(0)` or `os._exit(0)`
midway all fail. A guard (an audit hook, in place before the program starts) refuses what would let
the program send that message itself: making any socket object, except on that line; tracing;
other threads' frames and gc walks; new audit hooks; exec in place; subinterpreters; ctypes and
native modules from outside the standard library. A refused call ends the program as a failure.

What one process cannot close: the program and its tests share an interpreter, so an answer that
returns objects equal to everything, or replaces what the tests call, passes; the sandbox judges
that the program ran to its end, not that its tests are sound. A program that corrupts the
interpreter's memory (hand-made bytecode through marshal or code objects, a CPython memory bug) can
do whatever the last line does. In the fallback the program is dumpable and runs as the user, so a
helper process it starts can ptrace it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from codegpt.tasks.sandbox_runner import WRAPPER, judge, verdict_channel

RUNNER = Path(__file__).with_name("sandbox_runner.py")
FIRST_UID = 61_000  # uids 61000.. are unused on Debian-like systems; one per worker slot


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    file_bytes: int = 16 << 20
    processes: int = 32


@dataclass
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout | output_limit
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@functools.lru_cache(maxsize=None)
def isolation() -> str:
    """'namespaces' where the full sandbox is available here, else 'rlimits'."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return "rlimits"
    try:
        probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--ipc", "--fork", "--kill-child",
                                "--mount-proc", "true"],
                               capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "rlimits"
    return "namespaces" if probe.returncode == 0 else "rlimits"


def _read_capped(stream, limit: int, sink: list, overflow: threading.Event) -> None:
    total = 0
    while chunk := stream.read(65536):
        if total < limit:
            sink.append(chunk[: limit - total])
        total += len(chunk)
        if total > limit:
            overflow.set()
    stream.close()


def _fallback_limits(limits: Limits):
    def apply():
        # SIGXCPU at the soft CPU limit (reported as a timeout), SIGKILL a second later.
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        for limit, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_FSIZE, limits.file_bytes),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(limit, (value, value))

    return apply


def run(code: str, limits: Limits = Limits(), slot: int = 0) -> Outcome:
    """Run `code` as a Python program under the sandbox; never raises for what the program does."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if isolation() == "namespaces":
            argv = ["unshare", "--net", "--mount", "--pid", "--ipc", "--fork", "--kill-child", sys.executable, "-I",
                    str(RUNNER), str(FIRST_UID + slot), str(limits.cpu_seconds), str(limits.memory_bytes),
                    str(limits.file_bytes), str(limits.processes)]
            stdin_data, cwd, preexec, channel = code.encode(), "/", None, None
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="codegpt-sandbox-"))
            Path(workdir, "program.py").write_text(code)
            ours, theirs = channel = verdict_channel()
            stack.callback(ours.close)
            stack.callback(theirs.close)
            argv = [sys.executable, "-I", "-c", WRAPPER, str(theirs.fileno()), "-1"]
            stdin_data, cwd, preexec = b"", workdir, _fallback_limits(limits)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, start_new_session=True, preexec_fn=preexec,
                                pass_fds=[channel[1].fileno()] if channel else (),
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
        if channel:
            channel[1].close()
        out, err, overflow = [], [], threading.Event()
        readers = [threading.Thread(target=_read_capped, args=(s, limits.output_bytes, sink, overflow), daemon=True)
                   for s, sink in ((proc.stdout, out), (proc.stderr, err))]
        for reader in readers:
            reader.start()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin_data)
            proc.stdin.close()
        status = None
        deadline = started + limits.wall_seconds
        while proc.poll() is None:
            if overflow.is_set():
                status = "output_limit"
            elif time.perf_counter() > deadline:
                status = "timeout"
            if status:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
        for reader in readers:
            reader.join(timeout=5)
        # Under namespaces the runner has judged already; here the program is our own child.
        returncode, note = judge(proc.returncode, channel[0], proc.pid) if channel else (proc.returncode, "")
    stdout = b"".join(out).decode("utf-8", errors="replace")
    stderr = b"".join(err).decode("utf-8", errors="replace") + note
    if status is None and returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        status = "timeout"  # the CPU-time limit (the runner reports its child's signal as 128 + n)
    if status is None:
        status = "passed" if returncode == 0 else "failed"
    return Outcome(status == "passed", status, returncode, stdout, stderr, time.perf_counter() - started)


def run_many(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """Run programs in parallel, each worker on its own sandbox slot (and uid)."""
    workers = workers or max(1, os.cpu_count() or 1)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(code: str) -> Outcome:
        slot = slots.get()
        try:
            return run(code, limits, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))
