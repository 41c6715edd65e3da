"""HumanEval infilling, by execution: holes cut from HumanEval's canonical solutions, filled by a
model that sees the code before and after each hole, scored by running HumanEval's tests on the
completed program.

The holes are those of InCoder (Fried et al. 2022), released with the FIM paper (Bavarian et al.
2022) as openai/human-eval-infilling, with the same task ids and counts:

- `humaneval-infill-single` (1,033 holes): each non-blank line of a solution in turn.
- `humaneval-infill-multi` (5,815 holes): every contiguous run of lines that starts and ends on a
  non-blank line, single lines included (1,033 of the 5,815), as in the released set.

prefix = the prompt and the solution's lines before the hole, middle = the masked lines with their
newlines, suffix = everything after; prefix + middle + suffix is the prompt and solution exactly.
The masked lines score 1.0; an empty infill passes 27 single-line holes (2.6%) and 55 multi-line
ones (0.9%), where the lines removed do not matter to the tests (a comment, a redundant case).
A run of the whole multi-line set costs 5,815 generations per sample, so `limit` draws a seeded
subsample spread over all 164 problems (the first N holes would all come from the first few).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from codegpt.base.tokenizer import EOT
from codegpt.tasks.benchmarks import REFERENCE_LIMITS, score_programs
from codegpt.tasks.humaneval import Problem, check_program, load_problems
from codegpt.tasks.sandbox import Limits

SINGLE = "humaneval-infill-single"
MULTI = "humaneval-infill-multi"
BENCHMARKS = (SINGLE, MULTI)
_ID_PREFIX = {SINGLE: "SingleLineInfilling", MULTI: "MultiLineInfilling"}


@dataclass(frozen=True)
class InfillProblem:
    task_id: str  # e.g. SingleLineInfilling/HumanEval/0/L3, MultiLineInfilling/HumanEval/0/L0_L7
    benchmark: str
    problem: Problem  # its test and entry_point check the completed program
    first: int  # the hole: lines first..last of the canonical solution, 0-based, inclusive
    last: int
    prefix: str
    middle: str
    suffix: str

    def program(self, infill: str) -> str:
        """A program that exits normally only if prefix + infill + suffix passes the tests."""
        return check_program(self.problem, self.prefix[len(self.problem.prompt):] + infill + self.suffix)


def infill_problems(benchmark: str, problems: list[Problem] | None = None, limit: int | None = None,
                    seed: int = 0) -> list[InfillProblem]:
    """The benchmark's holes in HumanEval order (problem, then first line, then last line), or a
    seeded subsample of `limit` of them in that order."""
    id_prefix = _ID_PREFIX[benchmark]  # a KeyError names an unknown benchmark before any work
    items = []
    for problem in load_problems() if problems is None else problems:
        # Lines split at "\n" only, as the released task ids count them (splitlines would also
        # split at \f or \x1c inside a string literal).
        lines = re.findall(r"[^\n]*\n|[^\n]+", problem.canonical_solution)
        ends = [i for i, line in enumerate(lines) if line.strip()]
        spans = [(i, i) for i in ends] if benchmark == SINGLE else [(a, b) for a in ends for b in ends if a <= b]
        for first, last in spans:
            span = f"L{first}" if benchmark == SINGLE else f"L{first}_L{last}"
            items.append(InfillProblem(
                f"{id_prefix}/{problem.task_id}/{span}", benchmark, problem, first, last,
                problem.prompt + "".join(lines[:first]), "".join(lines[first : last + 1]), "".join(lines[last + 1 :])))
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def postprocess(problem: InfillProblem, text: str) -> str:
    """The infill that a model's generation for `problem` stands for.

    The generation ends at <|endoftext|> (generate() stops there; the cut serves raw samples that
    still carry it). Single-line holes take the first line, leading newlines dropped, as InCoder's
    and bigcode-evaluation-harness's single-line scoring do: the hole is one line, and what follows
    it would only repeat the suffix. Multi-line holes take the whole text, as the FIM paper does:
    knowing where to stop is part of the task. A non-empty infill gets a final newline if it lacks
    one, so that its last line does not run into the suffix's first; an empty one stays empty.
    """
    text = text.split(EOT, 1)[0]
    if problem.benchmark == SINGLE:
        text = text.lstrip("\n").split("\n", 1)[0]
    return text if not text or text.endswith("\n") else text + "\n"


def score_infill(items: list[InfillProblem], samples: dict[str, list[str]], ks=(1, 10, 100),
                 limits: Limits = REFERENCE_LIMITS, workers: int | None = None) -> dict:
    """pass@k over the holes of one benchmark (samples: raw generations by task id), and per-hole
    pass counts."""
    programs = {item.task_id: [item.program(postprocess(item, s)) for s in samples[item.task_id]] for item in items}
    return {"benchmark": items[0].benchmark, **score_programs(programs, ks, limits, workers)}
