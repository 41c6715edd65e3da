"""The inside of the sandbox: run once per program, as root, as PID 1 of fresh network, mount, PID
and IPC namespaces (started by `unshare` from tasks/sandbox.py). It never runs the program's code.

It makes every mount of the machine read-only, mounts a proc of its own PID namespace and empty
tmpfs over the scratch directories, writes the program into a private directory, and runs it in
a child process under resource limits. The child runs WRAPPER, which installs the guard (an
audit hook) and drops to an unprivileged uid of its own before the program starts; the change of
uid also makes the process undumpable, so neither it nor its helpers can read or write its memory
through /proc or ptrace.

The verdict: the program passes only if WRAPPER's last line, reached after the program ran to its
end, sends a message carrying a file descriptor (SCM_RIGHTS) over a socket to this process, and
the kernel vouches that the sender is that child (SCM_CREDENTIALS). No secret is involved, so
there is none to find. `os.write` on the socket cannot carry a descriptor; a socket object on it
can only be made on that one line of that one frame (the guard refuses every other `socket()`);
another process (a helper, or the program re-executed into a fresh interpreter) sends with the
wrong pid or is refused. See tasks/sandbox.py for what this does not close.

Arguments: uid cpu_seconds memory_bytes file_bytes processes. Standard input: the program.
"""

import ctypes
import os
import re
import resource
import socket
import struct
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000)
PER_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 0x400,
                   "nodiratime": 0x800, "relatime": 0x200000, "nosymfollow": 0x100}
MNT_DETACH = 2
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")
VERDICT = b"done"

# Run as `python -I -c WRAPPER <socket fd> <uid, or -1 to keep this one>` in the program's directory.
# The guard keeps the program from making a socket object (the verdict's only carrier), from
# tracing or profiling (jumping a frame to the last line), from reaching other threads' frames or
# walking the garbage collector (the guard's own state), from adding audit hooks, from exec'ing in
# place (a fresh interpreter with the same pid and no guard), from starting subinterpreters, and
# from loading native modules that reach raw memory (ctypes, the _test* modules, any extension
# outside the standard library's lib-dynload). A refused event ends the program with status 1.
_WRAPPER = r'''
import os, sys, traceback
from _socket import socket, AF_UNIX, SOCK_SEQPACKET, SOL_SOCKET, SCM_RIGHTS


def guard(trusted, line, dynload):
    denied = frozenset({"sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
                        "sys.addaudithook", "sys.monitoring.register_callback", "gc.get_objects",
                        "gc.get_referrers", "gc.get_referents", "os.exec", "cpython.PyInterpreterState_New"})
    native = ("_ctypes", "_cffi", "_test", "_xx", "_interp")

    # Everything it uses is bound now: it calls nothing the program can replace, and never raises
    # (a traceback would hand the program its frame).
    def hook(event, args, trusted=trusted, line=line, dynload=dynload, denied=denied, native=native,
             getframe=sys._getframe, type=type, str=str, len=len, write=os.write, exit=os._exit):
        try:
            if type(event) is not str or event == "sys._getframe":
                return
            if event == "socket.__new__":
                frame = getframe(1)
                if frame is trusted and frame.f_lineno == line:
                    return
            elif event == "import":
                name, path = args[0], args[1]
                if type(name) is str and not name.startswith(native) and (path is None or (
                        type(path) is str and path.startswith(dynload) and "/" not in path[len(dynload):]
                        and not path[len(dynload):].startswith(native))):
                    return
            elif event not in denied:
                return
            what = event + " " + args[0] if event == "import" and type(args[0]) is str else event
            write(2, b"sandbox: " + what.encode() + b" is not allowed\n")
        except BaseException:
            pass
        exit(1)

    sys.addaudithook(hook)


def main():
    fd, uid = int(sys.argv[1]), int(sys.argv[2])
    sys.argv[:] = ["program.py"]
    with open("program.py") as f:
        source = f.read()
    guard(sys._getframe(), @TAIL@, os.path.join(os.path.dirname(os.__file__), "lib-dynload", ""))
    os.set_inheritable(fd, False)
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    scope = {"__name__": "__main__", "__file__": "program.py"}
    try:
        exec(compile(source, "program.py", "exec"), scope)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise SystemExit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    socket(AF_UNIX, SOCK_SEQPACKET, 0, fd).sendmsg([@VERDICT@], [(SOL_SOCKET, SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])


main()
'''
WRAPPER = _WRAPPER.replace("@TAIL@", str(_WRAPPER.split("\n").index(
    next(line for line in _WRAPPER.split("\n") if "sendmsg(" in line)) + 1)).replace("@VERDICT@", repr(VERDICT))


def verdict_channel() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): the program gets `theirs`; `ours` learns each message's sender."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return ours, theirs


def finished(ours: socket.socket, pid: int) -> bool:
    """Whether process `pid` sent the verdict with a descriptor attached; call after it exited."""
    ours.setblocking(False)
    found = False
    while True:
        try:
            data, ancillary, _, _ = ours.recvmsg(64, socket.CMSG_SPACE(64) + socket.CMSG_SPACE(12))
        except (BlockingIOError, InterruptedError):
            return found
        if not data and not ancillary:
            return found  # every message carries credentials: this is the end of the stream
        sender, descriptors = None, False
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                descriptors = True
                for received in struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]):
                    os.close(received)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = struct.unpack("i", payload[:4])[0]
        found = found or (data == VERDICT and descriptors and sender == pid)


def judge(code: int, ours: socket.socket, pid: int) -> tuple[int, str]:
    """The exit status the sandbox reports, and a note for stderr: status 0 without the verdict
    (os._exit(0) halfway, say) is reported as 1."""
    if code == 0 and not finished(ours, pid):
        return 1, "sandbox: the program exited with status 0 before its end\n"
    return code, ""


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def umount(target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(target.encode(), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"umount {target}: {os.strerror(ctypes.get_errno())}")


def read_only_everywhere() -> None:
    """Every mount of this (private) mount namespace becomes read-only, whatever its permissions
    say, so no place the host can see (/run/lock, a 1777 directory anywhere) takes a write."""
    for line in open("/proc/self/mountinfo"):
        fields = line.split(" - ")[0].split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        # The flags a bind remount would otherwise clear (and that a user namespace may lock).
        flags = sum(PER_MOUNT_FLAGS.get(option, 0) for option in fields[5].split(","))
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
        except FileNotFoundError:
            pass  # a mount point that was deleted; nothing can be reached through it


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
    program = sys.stdin.buffer.read()
    prefix, executable = os.path.realpath(sys.base_prefix), os.path.realpath(sys.executable)
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing mounted here is seen outside
    read_only_everywhere()
    # The machine's processes stay out of sight; hidepid also hides this (root) process.
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    for path in SCRATCH:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64m,mode=1777")
    python = expose_interpreter(prefix, executable)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "program.py"), "wb") as f:
        f.write(program)
    for path in (work, os.path.join(work, "program.py")):
        os.chown(path, uid, uid)
    ours, theirs = verdict_channel()
    pid = os.fork()
    if pid == 0:
        os.chdir(work)
        # SIGXCPU at the soft CPU limit (reported as a timeout), SIGKILL a second later.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        for limit, value in ((resource.RLIMIT_AS, memory),
                             (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_NPROC, processes),
                             (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
            resource.setrlimit(limit, (value, value))
        os.set_inheritable(theirs.fileno(), True)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        # Started as root: WRAPPER drops to `uid` itself, after the guard is in place.
        os.execve(python, [python, "-I", "-c", WRAPPER, str(theirs.fileno()), str(uid)], env)
    theirs.close()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    code, note = judge(code if code >= 0 else 128 - code, ours, pid)
    sys.stderr.write(note)
    sys.stderr.flush()
    # As PID 1 of the namespace, leaving takes every process the program left behind with it.
    os._exit(code)


if __name__ == "__main__":
    main()
