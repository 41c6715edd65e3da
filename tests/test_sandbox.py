"""The sandbox survives hostile programs, reports each as a failure, and leaves the machine as it was."""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import codegpt.tasks.sandbox as sandbox
from codegpt.tasks.sandbox import Limits, leased_uids, run, run_many

LIMITS = Limits(wall_seconds=3, cpu_seconds=3, memory_bytes=512 << 20, output_bytes=64 << 10)
MODES = ["namespaces", "rlimits"] if sandbox.isolation() == "namespaces" else ["rlimits"]
ROOT = Path(__file__).resolve().parent.parent


def hostile_programs(victim: Path) -> dict[str, str]:
    return {
        "infinite loop": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(60)",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory hog": "blocks = []\nwhile True:\n    blocks.append(bytearray(100 << 20))",
        "write outside": f"open({str(victim)!r}, 'w').write('pwned')\nopen({str(ROOT / 'PWNED')!r}, 'w').write('x')",
        "delete outside": f"import shutil\nshutil.rmtree({str(victim.parent)!r})",
        # From a helper process: the program itself may not even make a socket.
        "network": "import subprocess, sys\nsubprocess.run([sys.executable, '-c', \"import socket; "
                   "socket.create_connection(('127.0.0.1', 22), timeout=1)\"], check=True)",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)",
        "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "sys.exit(0)": "import sys\nsys.exit(0)\nassert False",
        "os._exit(0)": "import os\nos._exit(0)",
        "huge output": "while True:\n    print('x' * 10000)",
        "deep recursion": "import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1)\nf(0)",
        "orphan": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nelse:\n    raise SystemExit(3)",
    }


def test_hostile_programs_fail_and_change_nothing_outside(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    programs = hostile_programs(victim)
    started = time.perf_counter()
    outcomes = dict(zip(programs, run_many(list(programs.values()), LIMITS, workers=4)))
    assert time.perf_counter() - started < 60
    for name, outcome in outcomes.items():
        assert not outcome.passed, f"{name}: {outcome}"
    assert outcomes["infinite loop"].status == "timeout" and outcomes["sleep"].status == "timeout"
    assert outcomes["huge output"].status == "output_limit"
    assert len(outcomes["huge output"].stdout) <= LIMITS.output_bytes
    assert victim.read_text() == "keep me" and not (ROOT / "PWNED").exists()
    # The evaluator is alive and the sandbox still works after all of that.
    assert run("print(sum(range(10)))", LIMITS).stdout == "45\n"
    if sandbox.isolation() == "namespaces":
        assert "Network is unreachable" in outcomes["network"].stderr
        assert os.popen(f"ps -u {sandbox.FIRST_UID} -u {sandbox.FIRST_UID + 1} -o pid=").read().strip() == ""


def test_a_correct_program_passes_and_its_output_comes_back():
    outcome = run("import math\nprint(math.factorial(5))\nassert math.gcd(12, 18) == 6", LIMITS)
    assert outcome.passed and outcome.status == "passed" and outcome.stdout == "120\n"


def test_failures_carry_the_traceback():
    outcome = run("def f(x):\n    return x + 1\nassert f(1) == 3, 'wrong'", LIMITS)
    assert not outcome.passed and "AssertionError: wrong" in outcome.stderr


def test_fallback_without_namespaces_still_refuses_fake_success(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: "rlimits")
    outcomes = run_many(["import sys\nsys.exit(0)", "import os\nos._exit(0)", "while True: pass", "print('ok')"],
                        Limits(wall_seconds=2, cpu_seconds=2), workers=2)
    assert [o.passed for o in outcomes] == [False, False, False, True]
    assert outcomes[2].status == "timeout"


# Three children that outlive the program: one in its session, one in a session of its own, one in
# a session of its own and another directory (only its stdout ties it to the program). Each would
# print "late" two seconds on; the program prints their pids and ends at once.
LEFT_BEHIND = """
import os, time
def child(escape):
    pid = os.fork()
    if pid == 0:
        escape()
        time.sleep(2)
        print("late", flush=True)
        time.sleep(60)
        os._exit(0)
    return pid
def elsewhere():
    os.setsid()
    os.chdir("/")
print(child(lambda: None), child(os.setsid), child(elsewhere), flush=True)
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.parametrize("mode", MODES)
def test_what_a_program_leaves_behind_dies_when_it_ends(mode, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: mode)
    limits = Limits(wall_seconds=8, cpu_seconds=8)
    outcome = run(LEFT_BEHIND, limits)
    assert outcome.passed, outcome
    # Returned before the wall limit, and none of them lived long enough to print.
    assert outcome.seconds < limits.wall_seconds and "late" not in outcome.stdout
    if mode == "rlimits":  # the pids mean something out here
        assert [pid for pid in map(int, outcome.stdout.split()) if alive(pid)] == []


# Forks children that sleep until RLIMIT_NPROC refuses one (or 200 of them); prints the limit it
# saw and how many it made.
FORKS = """
import os, resource, time
print(*resource.getrlimit(resource.RLIMIT_NPROC))
n = 0
try:
    while n < 200:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError:
    pass
print(n)
"""

# As an unprivileged user, in the fallback: the interpreter (under /root, mode 700, here) is made
# reachable in a mount namespace of its own, then this process becomes `uid` for good and runs
# the programs given as JSON. /tmp stays the host's: the repository and its venv may live there.
AS_A_USER = """
import json, os, sys
from codegpt.tasks.sandbox_runner import MS_PRIVATE, MS_REC, expose_interpreter, mount
mount("none", "/", None, MS_REC | MS_PRIVATE, None)
expose_interpreter(os.path.realpath(sys.base_prefix), os.path.realpath(sys.executable))
uid, programs = int(sys.argv[1]), json.loads(sys.argv[2])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
from codegpt.tasks.sandbox import Limits, isolation, run
report = {"isolation": isolation()}
for name, code in programs.items():
    outcome = run(code, Limits(wall_seconds=8, cpu_seconds=8, processes=16))
    report[name] = {"passed": outcome.passed, "stdout": outcome.stdout, "seconds": outcome.seconds}
print(json.dumps(report))
"""


def processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if int(status["Uid"].split()[0]) == uid and status["State"].split()[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root to become a user")
def test_fallback_as_a_user_bounds_forks_and_leaves_nothing_running():
    with leased_uids(1) as [uid]:  # a uid no sandbox uses meanwhile
        try:
            programs = json.dumps({"forks": FORKS, "left behind": LEFT_BEHIND})
            result = subprocess.run(["unshare", "--mount", sys.executable, "-c", AS_A_USER, str(uid), programs],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert report["isolation"] == "rlimits"
            assert len(report["forks"]["stdout"].split()) == 3, report  # the limit, then how many it forked
            soft, hard, forked = map(int, report["forks"]["stdout"].split())
            # RLIMIT_NPROC counts all of the user's tasks: what it ran at the start plus 16.
            assert soft == hard and 16 < soft < 200 and 0 < forked <= 16
            assert report["left behind"]["passed"] and "late" not in report["left behind"]["stdout"]
            assert report["left behind"]["seconds"] < 8
            # The 16 sleeping children and the three left behind all died with their programs.
            assert processes_of(uid) == []
        finally:
            for pid in processes_of(uid):
                os.kill(pid, 9)


def test_works_from_a_virtual_environment_under_tmp(tmp_path):
    """The scratch mounts hide /tmp: the interpreter must be found before they go up."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    # The editable install's hook, so that this interpreter imports our package as the repository's does.
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = next((tmp_path / "venv/lib").glob("python*/site-packages"))
    for hook in ours.glob("__editable__*codegpt*"):
        shutil.copy(hook, theirs)
    result = subprocess.run([str(tmp_path / "venv/bin/python"), "-c",
                             "from codegpt.tasks.sandbox import run; print(run('print(6 * 7)').stdout)"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "42", result.stderr


namespaces_only = pytest.mark.skipif(sandbox.isolation() != "namespaces", reason="needs the namespace sandbox")
PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs", "pstore",
             "bpf", "configfs", "fusectl", "binfmt_misc", "autofs", "efivarfs", "nsfs"}


def world_writable_dirs() -> list[str]:
    """Every world-writable directory of this machine, found by walking each mount of /proc/self/mountinfo."""
    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, fstype = line.split(" - ")[0].split(), line.split(" - ")[1].split()[0]
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        if fstype in PSEUDO_FS or not os.path.isdir(point):
            continue
        device, stack = os.stat(point).st_dev, [point]
        if os.stat(point).st_mode & 0o002:
            found.add(point)
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                        if not entry.is_dir(follow_symlinks=False) or st.st_dev != device:
                            continue
                        if st.st_mode & 0o002:
                            found.add(entry.path)
                        if os.access(entry.path, os.R_OK | os.X_OK):
                            stack.append(entry.path)
                    except OSError:
                        continue
    return sorted(found)


@namespaces_only
def test_no_writable_place_is_shared_with_the_host():
    places = world_writable_dirs()
    assert "/tmp" in places  # the walk works (and /run/lock is among them where the host has it)
    name = f"codegpt-sandbox-probe-{secrets.token_hex(8)}"
    code = (f"import os\nfor d in {places!r}:\n    try:\n"
            f"        with open(os.path.join(d, {name!r}), 'wb') as f:\n            f.write(b'x' * (1 << 20))\n"
            f"        print('wrote', d)\n    except OSError as e:\n        print('refused', d, e.errno)\n")
    try:
        outcome = run(code, LIMITS)
        assert outcome.passed, outcome
        # Inside, writes land only on the sandbox's own scratch space; nothing reaches the host.
        assert [p for p in places if os.path.exists(os.path.join(p, name))] == []
    finally:
        for p in places:
            Path(p, name).unlink(missing_ok=True)


def shared_memory_segments(size: int) -> list[str]:
    rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return [row.split()[1] for row in rows if int(row.split()[3]) == size]


@namespaces_only
def test_system_v_ipc_does_not_outlive_the_run():
    size = (8 << 20) + 4096 * secrets.randbelow(1000)  # a size no other segment has
    before = shared_memory_segments(size)
    try:
        outcome = run(f"import subprocess\nsubprocess.run(['ipcmk', '-M', '{size}'], check=True)", LIMITS)
        assert outcome.passed, outcome
        assert shared_memory_segments(size) == before
    finally:
        for shmid in set(shared_memory_segments(size)) - set(before):
            os.system(f"ipcrm -m {shmid}")


@namespaces_only
def test_the_program_sees_only_its_own_processes():
    code = ("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "try:\n    print(open('/proc/1/cmdline', 'rb').read())\nexcept OSError as e:\n    print('refused', e.errno)")
    outcome = run(code, LIMITS)
    assert outcome.passed, outcome
    pids, first = outcome.stdout.splitlines()[:2]
    assert len(eval(pids)) <= 2, pids  # itself (and the sandbox's init where it is visible)
    assert open("/proc/1/cmdline", "rb").read() not in first.encode()
