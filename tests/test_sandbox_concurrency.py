"""Two evaluators on one machine at once: each pool of sandbox workers runs as uids of its own, so a
fork bomb in one cannot keep the other's programs from forking, and a lease ends with its holder."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import codegpt.tasks.sandbox as sandbox
from codegpt.tasks.sandbox import FIRST_UID, UIDS, leased_uids
from tests.test_sandbox import alive

ROOT = Path(__file__).resolve().parent.parent

# One `codegpt evaluate`'s scoring: score_humaneval over the first N problems, one sample each.
EVALUATOR = """
import json, sys
from codegpt.tasks.benchmarks import score_humaneval
from codegpt.tasks.humaneval import load_problems
from codegpt.tasks.sandbox import time_limits

kind, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
BOMB = "\\n".join(["    import os", "    while True:", "        try:", "            os.fork()", "        except OSError:",
                  "            pass", ""])
# A correct answer whose program also starts a process (as one that shells out would).
FORKS = "\\nimport os\\nchild = os.fork()\\nif child == 0:\\n    os._exit(0)\\nassert os.waitpid(child, 0)[1] == 0\\n"
problems = load_problems()[:count]
samples = {p.task_id: [BOMB if kind == "bomb" else p.canonical_solution + FORKS] for p in problems}
if kind != "bomb":
    sys.stdin.readline()  # loaded: score when told to
report = score_humaneval(problems, samples, ks=(1,), limits=time_limits(seconds), workers=1)
print(json.dumps(report["per_problem"]))
"""


def descendants(pid: int) -> dict[int, int]:
    """The processes under `pid`, each with its uid."""
    parents, uids = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        parents[int(entry.name)], uids[int(entry.name)] = int(status["PPid"]), int(status["Uid"].split()[0])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return {p: uids[p] for p in found}


def sandboxed(processes: dict[int, int]) -> list[int]:
    return [pid for pid, uid in processes.items() if FIRST_UID <= uid < FIRST_UID + UIDS]


def evaluator(kind: str, count: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", EVALUATOR, kind, str(count), str(seconds)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(sandbox.isolation() != "namespaces", reason="sandbox uids need the namespace sandbox")
def test_a_fork_bomb_in_one_evaluator_leaves_the_other_alone():
    # The bomb's programs may run 60 s each: it is still going when the other evaluator is done.
    bomb, other = evaluator("bomb", 2, 60), evaluator("honest", 4, 30)
    try:
        for _ in range(600):
            if len(sandboxed(descendants(bomb.pid))) >= 16 or bomb.poll() is not None:
                break
            time.sleep(0.05)
        assert len(sandboxed(descendants(bomb.pid))) >= 16, bomb.communicate()[1] if bomb.poll() is not None else ""
        out, err = other.communicate("go\n", timeout=300)
        assert other.returncode == 0, err
        assert json.loads(out) == {f"HumanEval/{i}": {"passed": 1, "n": 1} for i in range(4)}
        assert bomb.poll() is None
    finally:
        other.kill()
        other.communicate()
        family = descendants(bomb.pid)
        bomb.kill()
        bomb.communicate()
        for _ in range(200):
            survivors = [pid for pid in family if alive(pid)]
            if not survivors:
                break
            time.sleep(0.05)
        for pid in survivors:  # so that a failure leaves no bomb behind (killing its PID 1 ends it)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # A killed evaluator takes its sandboxes with it.
    assert sandboxed(family) and survivors == []


HOLDER = """
import sys
from pathlib import Path
from codegpt.tasks.sandbox import leased_uids
with leased_uids(int(sys.argv[2]), Path(sys.argv[1])) as uids:
    print(*uids, flush=True)
    sys.stdin.read()
"""


def test_leases_are_disjoint_and_end_with_their_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "2"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        theirs = [int(uid) for uid in holder.stdout.readline().split()]
        assert len(theirs) == 2
        with leased_uids(3, tmp_path) as ours:
            assert len(ours) == 3 and not set(ours) & set(theirs)
            with leased_uids(1, tmp_path) as more:  # a second pool of this same process
                assert not set(more) & set(ours + theirs)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # No unlocking step: the kernel dropped the dead holder's locks.
    with leased_uids(2, tmp_path) as after:
        assert after == theirs == [FIRST_UID, FIRST_UID + 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{FIRST_UID + i}.lock" for i in range(6)]


def test_the_lease_directory_must_be_private(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(RuntimeError, match="no one else can write"):
        with leased_uids(1, shared):
            pass


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another uid")
def test_what_still_runs_as_a_leased_uid_is_killed():
    """A pool killed between two programs may leave one running; the uid's next holder ends it."""
    with leased_uids(1) as [uid]:
        left = subprocess.Popen(["sleep", "60"], user=uid, group=uid)
        try:
            sandbox._kill_every(sandbox._runs_as({uid}))
            assert left.wait(timeout=10) == -signal.SIGKILL
        finally:
            left.kill()
            left.wait()
