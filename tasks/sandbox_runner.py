"""The inside of the sandbox: run once per program, as root, inside fresh network, mount and PID
namespaces (started by `unshare` from tasks/sandbox.py).

It hides the machine's writable scratch space behind empty tmpfs mounts, writes the program into
a private directory, and runs it in a child process under resource limits and an unprivileged
uid of its own, so the program can neither write outside that directory, nor reach the network,
nor signal anything but its own processes. The program's success is a nonce printed after it
has run to completion: `sys.exit(0)` or `os._exit(0)` halfway through is not success.

Arguments: uid cpu_seconds memory_bytes file_bytes processes. Standard input: the nonce line, then the program.
"""

import ctypes
import os
import resource
import sys

MS_REC, MS_PRIVATE, MS_BIND, MS_NOSUID, MS_NODEV = 0x4000, 0x40000, 0x1000, 0x2, 0x4
MNT_DETACH = 2
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")

WRAPPER = r"""
import sys, traceback
nonce = sys.argv[1]
del sys.argv[1]
source = open("program.py").read()
scope = {"__name__": "__main__", "__file__": "program.py"}
try:
    exec(compile(source, "program.py", "exec"), scope)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    raise SystemExit(1)
sys.stdout.flush()
print("\n" + nonce, flush=True)
"""


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def umount(target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(target.encode(), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"umount {target}: {os.strerror(ctypes.get_errno())}")


def expose_interpreter(prefix: str, executable: str) -> str:
    """The real interpreter behind this (venv) Python, reachable by the unprivileged uid.

    An interpreter under a private directory (pyenv in /root, mode 700) is unreachable once the
    uid is dropped: hide that directory behind an empty tmpfs and bind only the interpreter's
    prefix back at its own path (its shared library is linked by absolute path). `prefix` and
    `executable` are resolved before the scratch mounts, which may hide the venv's own links."""
    ancestors = [prefix[:i] for i in range(1, len(prefix) + 1) if prefix[i : i + 1] in ("/", "")]
    blocked = next((a for a in ancestors if not os.stat(a).st_mode & 0o001), None)
    if blocked is None:
        return executable
    os.mkdir("/tmp/.python")
    mount(prefix, "/tmp/.python", None, MS_BIND | MS_REC, None)
    mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.makedirs(prefix, mode=0o755, exist_ok=True)
    mount("/tmp/.python", prefix, None, MS_BIND | MS_REC, None)
    umount("/tmp/.python")
    os.rmdir("/tmp/.python")
    return executable


def main() -> None:
    uid, cpu, memory, file_bytes, processes = (int(a) for a in sys.argv[1:6])
    nonce = sys.stdin.buffer.readline().decode().strip()
    program = sys.stdin.buffer.read()
    prefix, executable = os.path.realpath(sys.base_prefix), os.path.realpath(sys.executable)
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing mounted here is seen outside
    for path in SCRATCH:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    python = expose_interpreter(prefix, executable)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "program.py"), "wb") as f:
        f.write(program)
    for path in (work, os.path.join(work, "program.py")):
        os.chown(path, uid, uid)
    pid = os.fork()
    if pid == 0:
        os.chdir(work)
        # SIGXCPU at the soft CPU limit (reported as a timeout), SIGKILL a second later.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        for limit, value in ((resource.RLIMIT_AS, memory),
                             (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_NPROC, processes),
                             (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
            resource.setrlimit(limit, (value, value))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        os.execve(python, [python, "-I", "-c", WRAPPER, nonce], env)
    _, status = os.waitpid(pid, 0)
    # As PID 1 of the namespace, leaving takes every process the program left behind with it.
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
