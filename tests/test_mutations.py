"""Mutations: each kind makes the bug it names, every mutant parses and differs, the rest of the
source (comments, formatting) is untouched."""

import ast
import difflib
import random

import pytest

from codegpt.tasks.mutations import KINDS, mutate

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


NEUTRAL = '''def pick(values, a, b, attempt):
    """Only neutral places to mutate: messages and the order of a commutative builtin's arguments."""
    logger.info("attempt %d of %d", attempt, 3)
    log.warning("%s and %s", a, b)
    warnings.warn(f"{len(values) - 1} left")
    print("step", 2, a)
    assert values, "need %d values" % 1
    if not values:
        raise ValueError("need at least %d values, got %d" % (1, len(values)))
    return max(a, b) + min(values[0], values[-1])
'''


@pytest.mark.parametrize("kind", ["off_by_one", "swap_args", "arithmetic", "variable"])
def test_neutral_places_are_never_mutated(kind):
    """A bug in a message or in the order of max/min's arguments changes nothing a test can see."""
    for seed in range(30):
        mutation = mutate(NEUTRAL, random.Random(seed), kinds=(kind,))
        if mutation is None:
            continue
        (line,) = [l for l in changed_lines(NEUTRAL, mutation.buggy) if l.startswith("-")]
        assert any(place in line for place in ("return max", "if not values", "assert values")), (kind, line)
        assert '"need %d values" % 1' in mutation.buggy  # an assert's condition may change, its message not
        assert "max(b, a)" not in mutation.buggy and "min(values[-1], values[0])" not in mutation.buggy
