"""Mutations: each kind makes the bug it names, every mutant parses and differs, the rest of the
source (comments, formatting) is untouched."""

import ast
import difflib
import random

import pytest

from tasks.mutations import KINDS, mutate

SOURCE = '''def window_sums(values, size):
    """Sums of each run of `size` values."""  # docstring text is never mutated
    if size <= 0 or not values:
        return []
    total = sum(values[:size])  # first window
    sums = [total]
    for i in range(size, len(values)):
        total += values[i] - values[i - size]
        sums.append(total)
    return sums
'''


def changed_lines(a, b):
    return [l for l in difflib.ndiff(a.splitlines(), b.splitlines()) if l[:1] in "+-"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_makes_one_parsable_change(kind):
    mutation = mutate(SOURCE, random.Random(0), kinds=(kind,))
    assert mutation is not None and mutation.kind == kind
    assert ast.dump(ast.parse(mutation.buggy)) != ast.dump(ast.parse(SOURCE))
    removed = [l for l in changed_lines(SOURCE, mutation.buggy) if l.startswith("-")]
    # One line changed (two where a dropped `if` takes its body's indentation); comments survive.
    assert len(removed) == 1 or (kind == "condition" and len(removed) == 2)
    assert "# first window" in mutation.buggy and '"""Sums of each run' in mutation.buggy


def test_kinds_do_what_they_say():
    def diff(kind, seed=0):
        m = mutate(SOURCE, random.Random(seed), kinds=(kind,))
        return " ".join(changed_lines(SOURCE, m.buggy))

    assert any(op in diff("comparison") for op in ("size < 0", "!=", "not in"))
    assert any(op in diff("arithmetic") for op in ("-=", "values[i] + values", "i + size"))
    assert "if size <= 0 and not values:" in diff("boolean")
    assert "return None" in diff("return_value") or "return [] " in diff("return_value")


def test_mutations_are_deterministic_for_a_seed_and_cover_kinds():
    runs = [mutate(SOURCE, random.Random(seed)) for seed in range(40)]
    assert runs[:5] == [mutate(SOURCE, random.Random(seed)) for seed in range(5)]
    assert {m.kind for m in runs} == set(KINDS)


def test_nothing_to_mutate_gives_none():
    assert mutate("x = 1\n", random.Random(0)) is None
    assert mutate("def f(:\n", random.Random(0)) is None
    assert mutate("def f():\n    pass\n", random.Random(0)) is None
