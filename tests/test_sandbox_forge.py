"""Programs that try to forge a pass: each is a wrong answer that hunts for whatever the sandbox
might count as success and hands it back every way it can, then stops. All must fail."""

import textwrap
from pathlib import Path

import pytest

import codegpt.tasks.sandbox as sandbox
from codegpt.tasks.humaneval import check_program, load_problems
from codegpt.tasks.sandbox import Limits, run_many

LIMITS = Limits(wall_seconds=5, cpu_seconds=5, memory_bytes=512 << 20, output_bytes=256 << 10)
ROOT = Path(__file__).resolve().parent.parent
MODES = ["namespaces", "rlimits"] if sandbox.isolation() == "namespaces" else ["rlimits"]

# Prints every token it found (the most secret-looking last), writes them to every descriptor it
# has, then leaves with status 0.
SHOUT = """
import os, re, sys
def shout(tokens):
    tokens = [t if isinstance(t, bytes) else str(t).encode() for t in tokens]
    tokens.sort(key=lambda t: bool(re.fullmatch(rb"[0-9a-f]{16,64}", t)))
    for t in tokens:
        print(t.decode(errors="replace"), flush=True)
    for fd in range(3, 256):
        for t in tokens[:64]:
            try:
                os.write(fd, t)
            except OSError:
                break
    os._exit(0)
"""

REPLICATE_TAIL = """
import os
from _socket import socket, AF_UNIX, SOCK_SEQPACKET, SOL_SOCKET, SCM_RIGHTS
for fd in range(3, 64):
    try:
        socket(AF_UNIX, SOCK_SEQPACKET, 0, fd).sendmsg([b"done"], [(SOL_SOCKET, SCM_RIGHTS, fd.to_bytes(4, "little"))])
        print("sent on", fd, flush=True)
    except OSError:
        pass
os._exit(0)
"""

FORGERS = {
    "argv": "shout(open('/proc/self/cmdline', 'rb').read().split(b'\\0'))",
    "environment": """
tokens = list(os.environ.values())
try:
    tokens += open('/proc/self/environ', 'rb').read().split(b'\\0')
except OSError:
    pass
shout(tokens)""",
    "runner source": f"""
import re
tokens = []
for path in {[str(ROOT / "tasks/sandbox_runner.py"), str(ROOT / "tasks/sandbox.py")]!r}:
    try:
        text = open(path).read()
    except OSError:
        continue
    tokens += re.findall(r"[0-9a-f]{{16,}}", text) + text.splitlines()
shout(tokens)""",
    "frames": """
tokens, frame = [], sys._getframe()
while frame is not None:
    for scope in (frame.f_locals, frame.f_globals):
        tokens += [v for v in scope.values() if isinstance(v, (str, bytes, int))]
    frame = frame.f_back
tokens += sys.argv
shout(tokens)""",
    "gc": """
import gc
found = [v for o in gc.get_objects() if isinstance(o, dict) for v in o.values() if isinstance(v, str)]
shout([v for v in found if re.fullmatch("[0-9a-f]{32}", v)])""",
    "other threads' frames": "shout([repr(f.f_locals) for f in sys._current_frames().values()])",
    "plausible success line": "print('passed')\nprint('\\nok')\nprint('0' * 32)\nraise SystemExit(0)",
    "os._exit(0) after printing": "print('All tests passed.', flush=True)\nos._exit(0)",
    "the runner's message, written plainly": """
for fd in range(3, 64):
    try:
        os.write(fd, b"done")
    except OSError:
        pass
os._exit(0)""",
    "the runner's last step": REPLICATE_TAIL,
    # The runner's own frame calls what the program left in its globals, all C: no frame of the
    # program's is on the stack when the socket is made.
    "the runner's frame, made to send early": """
import functools, operator, types, _socket
frame = sys._getframe()
while frame.f_code.co_name != "main":
    frame = frame.f_back
fd = frame.f_locals["fd"]
make = functools.partial(_socket.socket, _socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, fd)
send = operator.methodcaller("sendmsg", [b"done"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
runner = frame.f_globals
runner["traceback"] = types.SimpleNamespace(print_exc=functools.partial(next, map(send, iter(make, None))))
sys.stderr = types.SimpleNamespace(flush=functools.partial(os._exit, 0))
raise ValueError""",
    "the last step from a helper process": f"""
import subprocess
def is_open(fd):
    try:
        return os.fstat(fd) is not None
    except OSError:
        return False
subprocess.run([sys.executable, "-c", {REPLICATE_TAIL!r}], pass_fds=list(filter(is_open, range(3, 64))), timeout=5)
os._exit(0)""",
    "the last step after exec": f"""
for fd in range(3, 16):
    try:
        os.set_inheritable(fd, True)
    except OSError:
        pass
os.execv(sys.executable, [sys.executable, "-c", {REPLICATE_TAIL!r}])""",
    "ctypes": """
import ctypes
libc = ctypes.CDLL(None)
shout([b"done"])""",
    "tracing": """
sys.settrace(lambda *args: None)
shout([b"done"])""",
}


def answer(body: str) -> str:
    """A wrong answer to add(a, b) that runs `body` when the tests call it."""
    return "def add(a, b):\n" + textwrap.indent(SHOUT + body, "    ") + "\n    return 0\n"


def program(candidate: str) -> str:
    return f"{candidate}\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"


@pytest.mark.parametrize("mode", MODES)
def test_forgers_fail_and_honest_answers_pass(mode, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: mode)
    honest = "def add(a, b):\n    return a + b\n"
    programs = [program(answer(body)) for body in FORGERS.values()] + [program(honest)]
    outcomes = run_many(programs, LIMITS, workers=2)
    for name, outcome in zip(FORGERS, outcomes):
        assert not outcome.passed, f"{mode}, {name}: {outcome}"
    assert outcomes[-1].passed, outcomes[-1]


@pytest.mark.parametrize("mode", MODES)
def test_a_forged_answer_scores_nothing_on_humaneval(mode, monkeypatch):
    """The trick from the issue: five problems, the argv trick as every answer, pass@1 = 0."""
    monkeypatch.setattr(sandbox, "isolation", lambda: mode)
    problems = load_problems()[:5]
    tricks = [textwrap.indent(SHOUT + FORGERS["argv"], "    "), textwrap.indent(REPLICATE_TAIL, "    ")]
    outcomes = run_many([check_program(p, t) for t in tricks for p in problems], LIMITS, workers=2)
    assert [o.passed for o in outcomes] == [False] * len(outcomes)
