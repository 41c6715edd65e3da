"""The Python tasks: how each builds examples from real functions, formats prompts, stops, and
scores an answer to one of its own examples.

- `docstring`: prompt = decorators + signature + docstring, completion = the body; `suffix` =
  the code after the function, for the task in fill-in-the-middle form (`task.format: infill`).
- `bugfix`: prompt = an instruction + the function with one injected bug, completion = the
  original function. The mutation kind is recorded.

Both drop HumanEval look-alikes (same function name, or a shared 8-word run in the docstring),
so the benchmark does not measure memorisation.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Iterator, Literal

from codegpt.base.errors import InvalidValue
from codegpt.base.recipe import validate_source
from codegpt.base.data.corpus import content_hash
from codegpt.tasks.extract_functions import Function
from codegpt.tasks.humaneval import STOP as HUMANEVAL_STOP
from codegpt.tasks.humaneval import load_problems
from codegpt.tasks.mutations import mutate

BUGFIX_INSTRUCTION = "# The function below has one bug. Write the function again with the bug fixed.\n"
BUGFIX_ANSWER = "# Fixed version:\n"


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=None)
def _humaneval_fingerprints() -> tuple[frozenset[str], frozenset[tuple[str, ...]]]:
    problems = load_problems()
    names = frozenset(p.entry_point for p in problems)
    grams = frozenset(g for p in problems for g in ngrams(p.prompt))
    return names, grams


def contaminated(function: Function) -> bool:
    names, grams = _humaneval_fingerprints()
    return function.name in names or bool(ngrams(function.docstring) & grams)


def _record(task: str, function: Function, **fields) -> dict:
    return {"task": task, **fields, "name": function.name, "path": function.path, "line": function.line}


@dataclass(frozen=True)
class DocstringTask:
    name: str = "docstring"
    stop: tuple[str, ...] = tuple(HUMANEVAL_STOP)

    def examples(self, functions: Iterable[Function], counts: dict) -> Iterator[dict]:
        for function in functions:
            yield _record(self.name, function, prompt=function.header, completion=function.body, suffix=function.after)

    def prompt(self, record: dict) -> str:
        return record["prompt"]

    def score(self, record: dict, completion: str) -> dict:
        """Without tests to run, a body counts when the function it completes parses (and once
        more when it equals the original, statement for statement). HumanEval runs the code.
        The header alone parses (a docstring is a body), so an answer that adds no statement
        (blank, or only comments) is no body and does not count."""
        written, reference = _parsed(record["prompt"] + completion), _parsed(record["prompt"] + record["completion"])
        if written == _parsed(record["prompt"]):
            written = None
        return {"parses": written is not None, "exact": written is not None and written == reference}


@dataclass(frozen=True)
class BugfixTask:
    name: str = "bugfix"
    # The model answers with a whole function; a second `# ...` line or a new prompt ends it.
    stop: tuple[str, ...] = ("\n# ", "\nif __name__", "\nprint(")

    def examples(self, functions: Iterable[Function], counts: dict) -> Iterator[dict]:
        for function in functions:
            source = function.source
            rng = random.Random(content_hash(source))
            mutation = mutate(source, rng, min_line=function.header.count("\n") + 1)
            if mutation is None:
                counts["no_mutation_site"] = counts.get("no_mutation_site", 0) + 1
                continue
            yield _record(self.name, function, prompt=bugfix_prompt(mutation.buggy), completion=source,
                          buggy=mutation.buggy, kind=mutation.kind, bug_line=mutation.line)

    def prompt(self, record: dict) -> str:
        return record["prompt"]

    def score(self, record: dict, completion: str) -> dict:
        """The answer fixes the bug when it is the original function, statement for statement
        (formatting and comments aside). The HumanEval bug-fix benchmark runs tests instead."""
        written = _parsed(completion)
        return {"parses": written is not None, "exact": written is not None and written == _parsed(record["completion"])}


def _parsed(source: str) -> str | None:
    """The AST of `source` as a comparable string, or None if it does not parse or holds no
    statement (a blank answer parses as an empty module, but answers nothing)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    return ast.dump(tree) if tree.body else None


def bugfix_prompt(buggy: str) -> str:
    return BUGFIX_INSTRUCTION + buggy.rstrip("\n") + "\n" + BUGFIX_ANSWER


TASKS = {"docstring": DocstringTask(), "bugfix": BugfixTask()}


def unknown_task(record: dict) -> str | None:
    """`read_jsonl`'s check for task examples: the record's task (docstring when it names none)
    must be one of TASKS, or its prompts and scores would be another task's."""
    name = record.get("task", "docstring")
    if isinstance(name, str) and name in TASKS:
        return None
    return f"unknown task {name!r} (tasks: {', '.join(TASKS)})"


def task_of(record: dict):
    return TASKS[record.get("task", "docstring")]


@dataclass
class TaskConfig:
    """A task's data: which task, from which code, where the jsonl goes."""

    name: str = "docstring"
    source: Literal["local", "files", "codeparrot"] = "local"
    paths: list[str] = field(default_factory=list)  # local: directories (default: the stdlib); files: jsonl/parquet
    data_dir: str = "data/tasks/docstring"
    val_fraction: float = 0.05  # by source file, the same files as the pretraining shards' val split
    max_examples: int | None = None
    max_chars: int = 4000  # functions longer than this are dropped (about 1000 tokens)
    # infill: the docstring task posed as fill in the middle (prefix = signature and docstring,
    # suffix = the code after the function, middle = the body), for models that infill.
    format: Literal["completion", "infill"] = "completion"

    def validate(self) -> None:
        if self.name not in TASKS:
            raise InvalidValue("name", f"unknown task {self.name!r} (tasks: {', '.join(TASKS)})")
        if not 0 < self.val_fraction < 1:
            raise InvalidValue("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.max_examples is not None and self.max_examples <= 0:
            raise InvalidValue("max_examples", f"must be positive, got {self.max_examples}")
        if self.max_chars <= 0:
            raise InvalidValue("max_chars", f"must be positive, got {self.max_chars}")
        if self.format == "infill" and self.name != "docstring":
            raise InvalidValue("format", f"infill is a form of the docstring task, not of {self.name}")
        validate_source(self.source, self.paths)
