"""Execution-scored benchmarks: HumanEval pass@k, and fixing bugs injected into HumanEval.

Both take the model's text and return scores; generating the text is the caller's business
(finetune/evaluate.py). Bug fixing: each canonical solution gets one bug of each kind that the
mutators can make, and only bugs that make at least one test fail are kept; a fix counts when
the model's function passes every test. HumanEval infilling (tasks/infill.py) is scored by
`score_programs` too. Each program may run `limits` (by default the reference harnesses' 3 s of wall
time, and as much CPU time), and every result records the wall time allowed as `timeout_seconds`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from codegpt.tasks.humaneval import TIMEOUT_SECONDS, Problem, check_program, pass_at_k, truncate
from codegpt.tasks.mutations import KINDS, mutate
from codegpt.tasks.registry import bugfix_prompt
from codegpt.tasks.sandbox import Limits, run_many, time_limits

REFERENCE_LIMITS = time_limits(TIMEOUT_SECONDS)


def score_humaneval(problems: list[Problem], samples: dict[str, list[str]], ks=(1, 10, 100),
                    limits: Limits = REFERENCE_LIMITS, workers: int | None = None) -> dict:
    """pass@k for every k that the number of samples allows, and per-problem pass counts."""
    programs = {p.task_id: [check_program(p, truncate(s)) for s in samples[p.task_id]] for p in problems}
    return {"benchmark": "humaneval", **score_programs(programs, ks, limits, workers)}


def score_programs(programs: dict[str, list[str]], ks=(1, 10, 100), limits: Limits = REFERENCE_LIMITS,
                   workers: int | None = None) -> dict:
    """Run every sample's check program (one list per problem): pass@k for every k that the
    number of samples allows, and per-problem pass counts."""
    jobs = [(task_id, program) for task_id, group in programs.items() for program in group]
    outcomes = run_many([program for _, program in jobs], limits, workers)
    passed = dict.fromkeys(programs, 0)
    for (task_id, _), outcome in zip(jobs, outcomes):
        passed[task_id] += outcome.passed
    n = min(map(len, programs.values()))
    scores = {f"pass@{k}": sum(pass_at_k(len(group), passed[t], k) for t, group in programs.items()) / len(programs)
              for k in ks if k <= n}
    return {"problems": len(programs), "samples_per_problem": n, "timeout_seconds": limits.wall_seconds, **scores,
            "per_problem": {t: {"passed": passed[t], "n": len(group)} for t, group in programs.items()}}


@dataclass(frozen=True)
class BugfixItem:
    problem: Problem
    kind: str
    buggy: str

    @property
    def prompt(self) -> str:
        return bugfix_prompt(self.buggy)

    def program(self, answer: str) -> str:
        # The problem's prompt first: it brings the imports and helpers the answer may leave out.
        return f"{self.problem.prompt}\n{answer}\n\n{self.problem.test}\n\ncheck({self.problem.entry_point})\n"


def bugfix_items(problems: list[Problem], seed: int = 0, limits: Limits = REFERENCE_LIMITS,
                 workers: int | None = None) -> list[BugfixItem]:
    """One bug per problem and kind where a mutator applies, kept only if a test catches it."""
    candidates = []
    for problem in problems:
        source = problem.prompt + problem.canonical_solution
        first_body_line = problem.prompt.count("\n") + 1
        for kind in KINDS:
            mutation = mutate(source, random.Random(f"{seed}:{problem.task_id}:{kind}"), (kind,), first_body_line)
            if mutation is not None:
                candidates.append(BugfixItem(problem, kind, mutation.buggy))
    outcomes = run_many([check_program_of(item) for item in candidates], limits, workers)
    return [item for item, outcome in zip(candidates, outcomes) if not outcome.passed]


def check_program_of(item: BugfixItem) -> str:
    return f"{item.buggy}\n\n{item.problem.test}\n\ncheck({item.problem.entry_point})\n"


def score_bugfix(items: list[BugfixItem], answers: list[str], limits: Limits = REFERENCE_LIMITS,
                 workers: int | None = None) -> dict:
    outcomes = run_many([item.program(answer) for item, answer in zip(items, answers)], limits, workers)
    fixed: dict[str, list[bool]] = defaultdict(list)
    for item, outcome in zip(items, outcomes):
        fixed[item.kind].append(outcome.passed)
    total = [ok for oks in fixed.values() for ok in oks]
    return {"benchmark": "bugfix", "bugs": len(items), "timeout_seconds": limits.wall_seconds,
            "fix_rate": sum(total) / max(1, len(total)),
            "per_kind": {kind: {"bugs": len(oks), "fixed": sum(oks), "fix_rate": sum(oks) / len(oks)}
                         for kind, oks in sorted(fixed.items())}}
