"""Task data: functions cut with ast, trivial and oversized ones dropped, HumanEval look-alikes
removed, bug-fix pairs that parse and differ, jsonl errors that name file and line."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from codegpt.base.recipe_loader import load_recipe
from codegpt.base.errors import UserError
from codegpt.tasks.build import TaskRecipe, build_task_data
from codegpt.tasks.extract_functions import functions_with_docstrings
from codegpt.tasks.jsonl import read_jsonl, write_jsonl
from codegpt.tasks.registry import TASKS, TaskConfig, contaminated

ROOT = Path(__file__).resolve().parent.parent

MODULE = '''import functools


class Shelf:
    @functools.lru_cache(maxsize=None)
    def count(self, kind):
        """How many items of `kind` are on the shelf.
Continuation lines may sit at column 0."""
        total = 0
        for item in self.items:  # comments stay
            if item.kind == kind:
                total += 1
        return total

    def todo(self):
        """Not written yet."""
        raise NotImplementedError

    def undocumented(self):
        return 1


async def fetch(url, retries=3):
    """Fetch `url`, retrying."""
    for attempt in range(retries):
        return await get(url)


def has_close_elements(numbers, threshold):
    """Check if in given list of numbers, are any two numbers closer to each other than given threshold."""
    return any(abs(a - b) < threshold for a in numbers for b in numbers if a is not b)
'''


def test_functions_are_cut_with_ast_and_dedented():
    counts = {}
    functions = {f.name: f for f in functions_with_docstrings(MODULE, "shelf.py", counts)}
    assert set(functions) == {"count", "fetch", "has_close_elements"}
    assert counts == {"trivial_body": 1}
    count = functions["count"]
    assert count.header.startswith("@functools.lru_cache(maxsize=None)\ndef count(self, kind):\n")
    assert count.header.endswith('column 0."""\n') and count.body.startswith("    total = 0\n")
    assert "# comments stay" in count.body and count.statements == 3
    assert ast.parse(count.source).body[0].name == "count"
    assert functions["fetch"].header.startswith("async def fetch")


def test_humaneval_look_alikes_are_dropped():
    functions = {f.name: f for f in functions_with_docstrings(MODULE, "shelf.py", {})}
    assert contaminated(functions["has_close_elements"])
    assert not contaminated(functions["count"])


def test_bugfix_examples_parse_differ_and_record_their_kind():
    functions = list(functions_with_docstrings(MODULE, "shelf.py", {}))
    examples = list(TASKS["bugfix"].examples(functions, {}))
    assert examples
    for example in examples:
        assert ast.dump(ast.parse(example["buggy"])) != ast.dump(ast.parse(example["completion"]))
        assert example["prompt"].startswith("# The function below has one bug.")
        assert example["prompt"].endswith("# Fixed version:\n") and example["buggy"] in example["prompt"]
        assert example["kind"] in ("comparison", "arithmetic", "boolean", "off_by_one", "variable", "condition",
                                   "swap_args", "return_value")
    again = list(TASKS["bugfix"].examples(functions, {}))
    assert again == examples  # the bug is a function of the code, not of the run


@pytest.mark.parametrize("task", ["docstring", "bugfix"])
def test_build_writes_train_and_val_split_by_file(tmp_path, task):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import json as json_module  # a real package of the standard library

    for path in Path(json_module.__file__).parent.glob("*.py"):
        (corpus / path.name).write_bytes(path.read_bytes())
    (corpus / "shelf.py").write_text(MODULE)
    config = TaskConfig(name=task, paths=[str(corpus)], data_dir=str(tmp_path / "out"), val_fraction=0.3)
    summary = build_task_data(config)
    train, val = read_jsonl(tmp_path / "out/train.jsonl"), read_jsonl(tmp_path / "out/val.jsonl")
    assert summary["examples"] == {"train": len(train), "val": len(val)} and train and val
    assert not {r["path"] for r in train} & {r["path"] for r in val}
    assert summary["dropped"]["humaneval_overlap"] >= 1
    assert "has_close_elements" not in {r["name"] for r in train + val}
    assert json.loads((tmp_path / "out/summary.json").read_text()) == summary


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"prompt": "a", "completion": "b"}])
    assert read_jsonl(path) == [{"prompt": "a", "completion": "b"}]
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    with pytest.raises(UserError, match=rf"^{path}:2: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(UserError, match=rf"^{path}:3: field 'completion' is missing$"):
        read_jsonl(path)


def test_unknown_task_is_a_recipe_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task:\n  name: docstrings\n")
    with pytest.raises(UserError, match=r"r.yaml:2: task.name: unknown task 'docstrings' \(tasks: docstring, bugfix\)"):
        load_recipe(TaskRecipe, recipe, sections=("task",))
    result = subprocess.run([sys.executable, "-m", "codegpt.tasks.build", str(recipe)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_tasks_score_answers_to_their_own_examples():
    functions = [f for f in functions_with_docstrings(MODULE, "shelf.py", {}) if f.name == "count"]
    (doc,) = TASKS["docstring"].examples(functions, {})
    assert TASKS["docstring"].score(doc, doc["completion"]) == {"parses": True, "exact": True}
    assert TASKS["docstring"].score(doc, doc["completion"].replace("+= 1", "+= 1  # one more")) == \
        {"parses": True, "exact": True}  # comments and spacing aside
    assert TASKS["docstring"].score(doc, "    return 0\n") == {"parses": True, "exact": False}
    assert TASKS["docstring"].score(doc, "    return (\n") == {"parses": False, "exact": False}
    (bug,) = TASKS["bugfix"].examples(functions, {})
    assert TASKS["bugfix"].score(bug, bug["completion"]) == {"parses": True, "exact": True}
    assert TASKS["bugfix"].score(bug, bug["buggy"]) == {"parses": True, "exact": False}


@pytest.mark.parametrize("answer", ["", "   \n\t\n", "    # TODO\n"])
def test_a_blank_answer_does_not_parse(answer):
    functions = [f for f in functions_with_docstrings(MODULE, "shelf.py", {}) if f.name == "count"]
    (doc,) = TASKS["docstring"].examples(functions, {})
    (bug,) = TASKS["bugfix"].examples(functions, {})
    assert TASKS["docstring"].score(doc, answer) == {"parses": False, "exact": False}
    assert TASKS["bugfix"].score(bug, answer) == {"parses": False, "exact": False}
