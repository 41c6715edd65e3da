"""The README's commands, read in order as a user would run them: every checkpoint a command reads
was made by an earlier command, an adapter is served on the base it was trained on, and no example
writes over what an earlier one made (another corpus's shards, another model's run)."""

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN = re.compile(r"^(checkpoints/[^/\s]+)")


def commands(text: str) -> list[list[str]]:
    """The commands of a README's bash blocks, in order, continuation lines joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] != "make":
                found.append(words)
    return found


def overrides(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and "/" not in w.split("=")[0])


def recipe_of(words: list[str]) -> tuple[dict, dict]:
    """(the recipe a training or data command runs, its overrides)."""
    path = next(w for w in words if w.startswith("recipes/"))
    return yaml.safe_load((ROOT / path).read_text()), overrides(words)


def run_dir(path: str) -> str | None:
    match = RUN.match(path)
    return match.group(1) if match else None


def test_each_command_reads_only_what_an_earlier_one_made():
    check_commands((ROOT / "README.md").read_text())


def is_training(words: list[str]) -> bool:
    return words[:2] in (["codegpt", "pretrain"], ["codegpt", "sft"]) or \
        any(w.endswith(("base/pretrain.py", "finetune/sft.py")) for w in words)


def check_commands(text: str) -> None:
    made: dict[str, dict] = {}  # run directory -> the recipe that trained it (empty for a merge)
    for words in commands(text):
        line = " ".join(words)
        if is_training(words):
            recipe, changes = recipe_of(words)
            out = run_dir(changes.get("out_dir", recipe["out_dir"]))
            if "base" in recipe:
                assert run_dir(recipe["base"]) in made, f"{line}: its base {recipe['base']} is made by no command before"
            model_changes = [key for key in changes if key.startswith("model.")]
            if out in made and model_changes and changes.get("train.resume") != "false":
                raise AssertionError(f"{line}: resumes {out} with another model ({', '.join(model_changes)})")
            made[out] = recipe
            continue
        if words[:2] == ["codegpt", "data"]:
            recipe, changes = recipe_of(words)
            if {"data.source", "data.paths"} & set(changes):
                assert "data.shard_dir" in changes, f"{line}: another corpus into {recipe['data']['shard_dir']}"
            continue
        # `codegpt merge ADAPTER OUT`, `codegpt convert SOURCE OUT`
        output = words[3] if words[:2] in (["codegpt", "merge"], ["codegpt", "convert"]) else None
        for word in words[1:]:
            run = run_dir(word.split("=", 1)[-1])  # `--adapter NAME=PATH` too
            if run and word != output:
                assert run in made, f"{line}: {run} is made by no command before"
        if words[:2] == ["codegpt", "serve"]:  # codegpt serve BASE --adapter NAME=PATH ...
            for flag, value in zip(words, words[1:]):
                if flag == "--adapter":
                    base = made[run_dir(value.split("=", 1)[-1])].get("base")
                    assert base == words[2], f"{line}: the adapter {value} was trained on {base}"
        if output and run_dir(output):
            made[run_dir(output)] = {}


def test_the_reading_finds_the_commands():
    found = [" ".join(words) for words in commands((ROOT / "README.md").read_text())]
    assert any(line.startswith("codegpt serve checkpoints/") and "--adapter docstring=" in line for line in found)
    assert any("codegpt evaluate checkpoints/bugfix-tiny/final" in line for line in found)
    assert any("data.source=files" in line for line in found)
    assert any(line.startswith("codegpt pretrain recipes/") for line in found)
