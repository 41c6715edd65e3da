"""Running model-generated programs: each in its own process, directory and limits.

Where this process is root and `unshare` works (Linux containers and CI here), every program runs
inside fresh network, mount, PID and IPC namespaces (tasks/sandbox_runner.py): no network at all,
every mount of the machine read-only, so the only writable places are its own empty /tmp, /var/tmp
and /dev/shm (tmpfs, 64 MiB each, gone with it), a proc of its own that shows no process of the
machine, System V IPC that dies with it, an unprivileged uid of its own, CPU-time, address-space,
file-size and process limits, and when it ends (or times out) the whole namespace dies with it.
The uids are leased (`leased_uids`): each pool of workers holds its own for as long as it runs,
one per worker, so two evaluators on one machine never share one; a fork bomb fills only its own
uid's RLIMIT_NPROC, and whatever runs as a uid belongs to one pool. A lease ends when its holder
does, SIGKILL included; the sandboxes it started die with it (PR_SET_PDEATHSIG), and the next
holder of a uid kills whatever might still run as it before using it.

Elsewhere (not root, no namespaces) the fallback is weaker and says so in `isolation()`: a new
session, a fresh temporary directory as cwd, the same CPU-time, address-space and file-size limits,
and no isolation of network, files, IPC or processes. RLIMIT_NPROC counts every process (thread,
in fact) of the user's, not the program's alone, so the fallback sets it to the number the user
runs when the program starts plus `Limits.processes`: a fork bomb stops after about that many,
but programs running side by side as one user (run_many's workers, another evaluator) share that
headroom, and one's fork bomb can make another's fork fail. The kernel does not apply it to root.
When the program ends (or times out), whatever it left behind is killed at once, as far as the
fallback can find it: every process in its session, or working in its directory, or holding a
write end of its output pipes or its verdict socket. A process that leaves all of these behind
(a new session, another directory, its descriptors closed) survives it.

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
import ctypes
import fcntl
import functools
import math
import os
import queue
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from codegpt.tasks.sandbox_runner import WRAPPER, judge, verdict_channel

RUNNER = Path(__file__).with_name("sandbox_runner.py")
FIRST_UID, UIDS = 61_000, 2_000  # uids 61000-62999 are unused on Debian-like systems
LEASES = Path("/run/codegpt-sandbox")  # one lock file per uid; /run is root's own and cleared at boot
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    file_bytes: int = 16 << 20
    processes: int = 32


def time_limits(seconds: float) -> Limits:
    """The default limits with `seconds` of wall time and as much CPU time (whole seconds, up)."""
    return Limits(wall_seconds=seconds, cpu_seconds=math.ceil(seconds))


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


@contextlib.contextmanager
def leased_uids(count: int, directory: Path = LEASES) -> Iterator[list[int]]:
    """`count` sandbox uids that no other pool on this machine holds while this one does.

    Each uid is held by an exclusive flock on a file of its own in `directory`. The kernel drops a
    flock when its file is closed, so a lease ends with its holder however that ends (SIGKILL
    included), and the next evaluator takes the uid with no manual step."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise RuntimeError(f"sandbox: {directory} must be a directory of this user's that no one else can write")
    held: dict[int, int] = {}
    try:
        for uid in range(FIRST_UID, FIRST_UID + UIDS):
            if len(held) == count:
                break
            held[uid] = os.open(directory / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(held[uid], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(held.pop(uid))
        if len(held) < count:
            raise RuntimeError(f"sandbox: {count} uids wanted, {len(held)} of {FIRST_UID}..{FIRST_UID + UIDS - 1} free")
        yield list(held)
    finally:
        for fd in held.values():
            os.close(fd)


@contextlib.contextmanager
def _sandbox_uids(count: int) -> Iterator[list[int]]:
    """Leased uids with nothing running as them: a pool that held one and died (SIGKILL between
    two programs) may have left a program behind, and as the lease's holder this pool is the
    uid's only rightful user, so killing by uid touches no one else's program."""
    with leased_uids(count) as uids:
        _kill_every(_runs_as(set(uids)))
        yield uids


def _read_capped(stream, limit: int, sink: list, overflow: threading.Event) -> None:
    total = 0
    while chunk := stream.read(65536):
        if total < limit:
            sink.append(chunk[: limit - total])
        total += len(chunk)
        if total > limit:
            overflow.set()
    stream.close()


def _pids() -> Iterator[int]:
    return (int(name) for name in os.listdir("/proc") if name.isdigit())


def _status(pid: int) -> dict[str, str] | None:
    """/proc/<pid>/status as a dict, or None where the process is gone."""
    try:
        return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return None


def _user_tasks() -> int:
    """How many tasks this process's real uid has now, as RLIMIT_NPROC counts them: every thread,
    and every zombie until it is reaped."""
    uid = str(os.getuid())
    return sum(int(status.get("Threads", "1")) for status in map(_status, _pids())
               if status and status["Uid"].split()[0] == uid)


def _kill_every(marked: Callable[[int], bool]) -> None:
    """SIGKILL every process that `marked` picks (never this one), round after round until none is
    left: a round also takes what the last round's processes forked before they died. Through
    pidfds (Linux 5.3 and later), so a pid that was reused meanwhile is never signalled."""
    for _ in range(1000):
        found = [pid for pid in _pids() if pid != os.getpid() and marked(pid)]
        if not found:
            return
        for pid in found:
            with contextlib.suppress(OSError):
                handle = os.pidfd_open(pid)
                try:
                    # The pidfd pins the process: it is signalled only if this one is still marked.
                    if marked(pid):
                        signal.pidfd_send_signal(handle, signal.SIGKILL)
                finally:
                    os.close(handle)
        time.sleep(0.001)


def _runs_as(uids: set[int]) -> Callable[[int], bool]:
    def marked(pid: int) -> bool:
        status = _status(pid)
        return (status is not None and status["State"].split()[0] not in ("Z", "X")
                and int(status["Uid"].split()[0]) in uids)

    return marked


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: a child between fork and exec must not dlsym


def _die_with_parent(parent: int) -> None:
    """In a child before exec: SIGKILL it when the thread that started it ends, or this process (a
    killed evaluator leaves no sandbox running). Kept across exec (unshare passes it on)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the line above


def _fallback_limits(limits: Limits, user_tasks: int):
    processes = user_tasks + limits.processes
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if hard != resource.RLIM_INFINITY:
        processes = min(processes, hard)
    parent = os.getpid()

    def apply():
        _die_with_parent(parent)
        # SIGXCPU at the soft CPU limit (reported as a timeout), SIGKILL a second later.
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        for limit, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_FSIZE, limits.file_bytes),
                             (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(limit, (value, value))

    return apply


@dataclass(frozen=True)
class _Traces:
    """What marks a process as left behind by a fallback program: its session, a working directory
    in its directory, or a write end of its output pipes or its verdict socket (`ends`, as
    /proc/<pid>/fd shows them). A sibling worker's child between fork and exec holds our pipes'
    read ends, never their write ends, so it is never taken for one."""

    session: int
    workdir: str
    ends: frozenset[str]

    def on(self, pid: int) -> bool:
        proc = f"/proc/{pid}"
        try:
            with open(f"{proc}/stat", "rb") as f:
                state, _, _, session = f.read().rsplit(b")", 1)[1].split()[:4]
            if state in (b"Z", b"X"):
                return False  # dead already, only not reaped
            if int(session) == self.session:
                return True
            cwd = os.readlink(f"{proc}/cwd")
            if cwd == self.workdir or cwd.startswith(self.workdir + "/"):
                return True
            for fd in os.listdir(f"{proc}/fd"):
                end = os.readlink(f"{proc}/fd/{fd}")
                if end in self.ends and (end.startswith("socket:") or _writes(f"{proc}/fdinfo/{fd}")):
                    return True
        except (OSError, ValueError):
            pass  # gone, or not ours to look at
        return False


def _writes(fdinfo: str) -> bool:
    flags = next(line for line in Path(fdinfo).read_text().splitlines() if line.startswith("flags:"))
    return int(flags.split()[1], 8) & os.O_ACCMODE != os.O_RDONLY


def _exited(pid: int) -> bool:
    """Whether child `pid` has ended, leaving it unreaped (its pid, the id of its process group and
    session, stays taken until then)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def run(code: str, limits: Limits = Limits(), uid: int | None = None) -> Outcome:
    """Run `code` as a Python program under the sandbox; never raises for what the program does.
    `uid`: one this caller leased (run_many's workers); without it, one is leased for this run."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if isolation() == "namespaces":
            if uid is None:
                [uid] = stack.enter_context(_sandbox_uids(1))
            argv = ["unshare", "--net", "--mount", "--pid", "--ipc", "--fork", "--kill-child", sys.executable, "-I",
                    str(RUNNER), str(uid), str(limits.cpu_seconds), str(limits.memory_bytes),
                    str(limits.file_bytes), str(limits.processes)]
            stdin_data, cwd, channel = code.encode(), "/", None
            preexec = functools.partial(_die_with_parent, os.getpid())
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="codegpt-sandbox-"))
            Path(workdir, "program.py").write_text(code)
            ours, theirs = channel = verdict_channel()
            stack.callback(ours.close)
            stack.callback(theirs.close)
            argv = [sys.executable, "-I", "-c", WRAPPER, str(theirs.fileno()), "-1"]
            stdin_data, cwd, preexec = b"", workdir, _fallback_limits(limits, _user_tasks())
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, start_new_session=True, preexec_fn=preexec,
                                pass_fds=[channel[1].fileno()] if channel else (),
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
        if channel:
            ends = [f"pipe:[{os.fstat(s.fileno()).st_ino}]" for s in (proc.stdout, proc.stderr)]
            traces = _Traces(proc.pid, os.path.realpath(workdir),
                             frozenset([*ends, f"socket:[{os.fstat(channel[1].fileno()).st_ino}]"]))
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
        while not _exited(proc.pid):
            if overflow.is_set():
                status = "output_limit"
            elif time.perf_counter() > deadline:
                status = "timeout"
            if status:
                break
            time.sleep(0.01)
        # Ended or not, what it started goes with it: under namespaces the PID namespace's end takes
        # every process; here the group, then whatever else the fallback can find.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if channel:
            _kill_every(traces.on)
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
    """Run programs in parallel, each worker on a sandbox uid of its own, leased for the pool."""
    workers = workers or max(1, os.cpu_count() or 1)
    with contextlib.ExitStack() as stack:
        uids = stack.enter_context(_sandbox_uids(workers)) if isolation() == "namespaces" else [None] * workers
        free: queue.Queue[int | None] = queue.Queue()
        for uid in uids:
            free.put(uid)

        def one(code: str) -> Outcome:
            uid = free.get()
            try:
                return run(code, limits, uid)
            finally:
                free.put(uid)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, programs))
