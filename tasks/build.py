"""Build a task's train.jsonl and val.jsonl from real code.

    codegpt tasks [recipe.yaml] [task.key=value ...]

Reads the `task` section of a recipe (recipes/docstring.yaml, recipes/bugfix.yaml, ...): the
task, the code to draw functions from (default: this Python's standard library), where to
write, the validation fraction. Prints what was kept and dropped, and why.

`task.data_dir` is the command's own: it holds train.jsonl, val.jsonl and summary.json, which
names the task (written first as `{"building": true}` before the examples, and complete last),
so a rebuild recognises a directory it made, even one a killed build left. A directory holding
anything else, or these names without such a summary, or the corpus itself, is refused before
any work.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from codegpt.base.recipe_loader import load_recipe, split_cli_args
from codegpt.base.data.corpus import (Document, FilterReport, codeparrot_documents, content_hash, default_local_paths,
                                      file_documents, filtered, local_documents)
from codegpt.base.errors import cli_entry
from codegpt.base.fileio import atomic_write_text, temporary_names
from codegpt.base.outputs import check_output
from codegpt.base.data.shards import in_val
from codegpt.tasks.extract_functions import functions_with_docstrings
from codegpt.tasks.jsonl import write_jsonl
from codegpt.tasks.registry import TASKS, TaskConfig, contaminated

USAGE = "usage: codegpt tasks [recipe.yaml] [task.key=value ...]"
SUMMARY_FILE = "summary.json"
OWN_FILES = ("train.jsonl", "val.jsonl", SUMMARY_FILE)


@dataclass
class TaskRecipe:
    task: TaskConfig = field(default_factory=TaskConfig)


def documents(config: TaskConfig, report: FilterReport) -> Iterator[Document]:
    if config.source == "codeparrot":
        return filtered(codeparrot_documents("train"), report)
    if config.source == "files":
        return filtered(file_documents(config.paths, report), report)
    return filtered(local_documents(config.paths, report), report)


def check_data_dir(config: TaskConfig) -> None:
    """Refuse a `task.data_dir` this command must not write (see base/outputs.py)."""
    corpus = config.paths or (default_local_paths() if config.source == "local" else [])
    check_output(config.data_dir, command="codegpt tasks", inputs={"corpus (task.paths)": corpus}, foreign=_foreign,
                 nest_in_inputs=True, key="task.data_dir")


def _foreign(data_dir: Path) -> str | None:
    """What in an existing `data_dir` this command did not make, or None."""
    summary_path = data_dir / SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    except (OSError, ValueError):
        summary = None
    temporary = temporary_names("|".join(map(re.escape, OWN_FILES)))
    for path in sorted(data_dir.iterdir()):
        if path.name not in OWN_FILES and not temporary.match(path.name):
            return f"holds {path.name}, which codegpt tasks did not make; task examples need a directory of their own"
    if not isinstance(summary, dict) or summary.get("task") not in TASKS:
        first = min(p.name for p in data_dir.iterdir())
        return (f"holds {first} but no {SUMMARY_FILE} of codegpt tasks, so codegpt tasks did not make it; task "
                "examples need a directory of their own")
    return None


def build_task_data(config: TaskConfig) -> dict:
    """Write <data_dir>/train.jsonl, val.jsonl and summary.json; returns the summary."""
    check_data_dir(config)
    task = TASKS[config.name]
    report = FilterReport()
    counts: dict[str, int] = {}
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for doc in documents(config, report):
        report.keep(len(doc.content.encode()))
        split = "val" if in_val(doc.content, config.val_fraction) else "train"
        for function in functions_with_docstrings(doc.content, doc.path, counts):
            if len(function.source) > config.max_chars:
                counts["oversized"] = counts.get("oversized", 0) + 1
            elif contaminated(function):
                counts["humaneval_overlap"] = counts.get("humaneval_overlap", 0) + 1
            elif (key := content_hash(function.source)) in seen:
                counts["duplicate"] = counts.get("duplicate", 0) + 1
            else:
                seen.add(key)
                splits[split].extend(task.examples([function], counts))
        if config.max_examples is not None and len(splits["train"]) + len(splits["val"]) >= config.max_examples:
            break
    out = Path(config.data_dir)
    atomic_write_text(out / SUMMARY_FILE, json.dumps({"task": config.name, "building": True}) + "\n")
    written = {name: write_jsonl(out / f"{name}.jsonl", records) for name, records in splits.items()}
    summary = {"task": config.name, "examples": written, "dropped": dict(sorted(counts.items())),
               "files": report.to_dict()}
    if config.name == "bugfix":
        kinds: dict[str, int] = {}
        for record in splits["train"] + splits["val"]:
            kinds[record["kind"]] = kinds.get(record["kind"], 0) + 1
        summary["kinds"] = dict(sorted(kinds.items()))
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


@cli_entry
def main(argv: list[str] | None = None) -> None:
    path, overrides = split_cli_args(sys.argv[1:] if argv is None else argv, USAGE)
    config = load_recipe(TaskRecipe, path, overrides, sections=("task",)).task
    summary = build_task_data(config)
    print(f"{config.name}: {summary['examples']['train']:,} train and {summary['examples']['val']:,} val "
          f"examples in {config.data_dir}")
    print("dropped: " + (", ".join(f"{k} {v:,}" for k, v in summary["dropped"].items()) or "none"))
    if "kinds" in summary:
        print("mutation kinds: " + ", ".join(f"{k} {v:,}" for k, v in summary["kinds"].items()))


if __name__ == "__main__":
    main()
