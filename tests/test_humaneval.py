"""HumanEval: the oracle scores 1.0, empty bodies score 0, and pass@k is the unbiased estimator."""

from math import comb

import pytest

from codegpt.tasks.humaneval import STOP, check_program, load_problems, pass_at_k, truncate
from codegpt.tasks.sandbox import Limits, run_many


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_all_164_problems_load(problems):
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert all(p.entry_point in p.prompt for p in problems)


def test_oracle_passes_everything_and_pass_bodies_pass_nothing(problems):
    chosen = problems[::4]  # 41 problems keep the test quick; the benchmark command runs all 164
    canonical = run_many([check_program(p, p.canonical_solution) for p in chosen], Limits(), workers=2)
    empty = run_many([check_program(p, "    pass\n") for p in chosen], Limits(), workers=2)
    assert [o.passed for o in canonical] == [True] * len(chosen)
    assert [o.passed for o in empty] == [False] * len(chosen)


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (200, 17, 10), (200, 0, 100), (5, 5, 1), (20, 19, 10)]:
        exact = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_truncate_cuts_at_the_next_top_level_statement():
    sample = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert truncate(sample) == "    return x + 1\n\n"
    assert truncate("    return 1\nprint(f(2))") == "    return 1"
    assert "\ndef " in STOP
