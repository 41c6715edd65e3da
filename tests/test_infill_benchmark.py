"""HumanEval infilling: the holes are InCoder's and the FIM paper's, the masked lines score 1.0, an
empty infill runs prefix + suffix alone and scores what the tests allow, and the subsample is fixed."""

import pytest

from codegpt.tasks.humaneval import check_program, load_problems
from codegpt.tasks.infill import MULTI, SINGLE, infill_problems, postprocess, score_infill
from codegpt.tasks.sandbox import Limits


@pytest.fixture(scope="module")
def holes():
    return {benchmark: infill_problems(benchmark) for benchmark in (SINGLE, MULTI)}


@pytest.fixture(scope="module")
def sample():
    # 24 holes of each benchmark keep the sandbox part quick; the oracle over every hole is checked
    # without running anything (its program is the canonical one), and the command runs them all.
    return infill_problems(SINGLE, limit=24) + infill_problems(MULTI, limit=24)


def test_counts_match_the_released_benchmarks(holes):
    assert len(holes[SINGLE]) == 1033 and len(holes[MULTI]) == 5815
    for items in holes.values():
        assert len({item.task_id for item in items}) == len(items)
    assert holes[SINGLE][3].task_id == "SingleLineInfilling/HumanEval/0/L3"
    assert holes[MULTI][-1].task_id.startswith("MultiLineInfilling/HumanEval/163/")


def test_holes_cut_the_solution_exactly(holes):
    problems = load_problems()
    per_problem = {p.task_id: 0 for p in problems}
    for item in holes[SINGLE]:
        per_problem[item.problem.task_id] += 1
        assert item.middle.count("\n") == 1 and item.middle.strip()
    for p in problems:
        assert per_problem[p.task_id] == sum(1 for line in p.canonical_solution.split("\n") if line.strip())
    for item in holes[SINGLE] + holes[MULTI]:
        source = item.problem.prompt + item.problem.canonical_solution
        assert item.prefix + item.middle + item.suffix == source
        assert item.prefix.startswith(item.problem.prompt) and item.prefix.endswith("\n")
        lines = item.middle.rstrip("\n").split("\n")
        assert len(lines) == item.last - item.first + 1 and lines[0].strip() and lines[-1].strip()


def test_masked_lines_are_their_own_infill_and_give_the_canonical_program(holes):
    for item in holes[SINGLE] + holes[MULTI]:
        assert postprocess(item, item.middle) == item.middle
        assert item.program(item.middle) == check_program(item.problem, item.problem.canonical_solution)


def test_oracle_scores_one(sample):
    for benchmark in (SINGLE, MULTI):
        items = [item for item in sample if item.benchmark == benchmark]
        report = score_infill(items, {item.task_id: [item.middle] for item in items}, workers=2)
        assert report["benchmark"] == benchmark and report["problems"] == 24 and report["pass@1"] == 1.0


def test_empty_infill_runs_prefix_and_suffix_alone(holes):
    for item in holes[SINGLE] + holes[MULTI]:
        alone = f"{item.prefix}{item.suffix}\n\n{item.problem.test}\n\ncheck({item.problem.entry_point})\n"
        assert item.program(postprocess(item, "")) == alone


def test_empty_infill_scores_what_the_tests_allow(sample):
    # A hole in a loop's update loops forever; HumanEval's tests pass in well under a second, so
    # 3 s instead of 10 fails those sooner without failing any program that ends.
    report = score_infill(sample, {item.task_id: [""] for item in sample}, limits=Limits(wall_seconds=3, cpu_seconds=3),
                          workers=2)
    passed = [item.task_id for item in sample if report["per_problem"][item.task_id]["passed"]]
    # Some lines do not matter to the tests: a comment, a special case the general code covers.
    assert passed and len(passed) < len(sample) and report["pass@1"] == len(passed) / len(sample)


def test_pass_at_k_counts_every_sample(holes):
    item = next(i for i in holes[SINGLE] if i.task_id == "SingleLineInfilling/HumanEval/0/L3")
    report = score_infill([item], {item.task_id: [item.middle, "", "                distance = 0\n"]}, ks=(1, 3),
                          workers=2)
    assert report["per_problem"][item.task_id] == {"passed": 1, "n": 3}
    assert report["pass@1"] == pytest.approx(1 / 3) and report["pass@3"] == 1.0


def test_multi_line_subsample_is_fixed_and_spread_over_humaneval(holes):
    first, again = infill_problems(MULTI, limit=100), infill_problems(MULTI, limit=100)
    assert [i.task_id for i in first] == [i.task_id for i in again]
    order = {item.task_id: n for n, item in enumerate(holes[MULTI])}
    assert [order[i.task_id] for i in first] == sorted(order[i.task_id] for i in first)
    assert len({item.problem.task_id for item in first}) > 50
    assert infill_problems(MULTI, limit=100, seed=1) != first
    assert infill_problems(MULTI, limit=10_000) == holes[MULTI]


def test_postprocess_keeps_one_line_for_single_and_the_whole_text_for_multi(holes):
    single, multi = holes[SINGLE][0], holes[MULTI][0]
    assert postprocess(single, "\n    x = 1\n    y = 2\n") == "    x = 1\n"
    assert postprocess(single, "    x = 1") == "    x = 1\n"
    assert postprocess(single, "") == "" and postprocess(multi, "") == ""
    assert postprocess(multi, "    x = 1\n\n    y = 2") == "    x = 1\n\n    y = 2\n"
    assert postprocess(multi, "    x = 1\n<|endoftext|>    junk") == "    x = 1\n"
