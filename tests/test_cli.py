"""The `codegpt` command, from the installed entry point: its help lists every subcommand, a
subcommand does its work, and pretraining goes through `accelerate launch` with launcher options."""

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from codegpt.cli import ALIASES, COMMANDS

ROOT = Path(__file__).resolve().parent.parent
CODEGPT = str(Path(sys.executable).with_name("codegpt"))
EMAIL = str(Path(sysconfig.get_paths()["stdlib"]) / "email")


def codegpt(*args, cwd=ROOT):
    return subprocess.run([CODEGPT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_every_subcommand_and_an_unknown_one_is_refused():
    result = codegpt("--help")
    assert result.returncode == 0
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS) | set(ALIASES) >= {"pretrain", "sft", "data", "tasks", "generate", "sample", "merge",
                                                       "evaluate", "convert", "serve", "quality"}
    wrong = codegpt("pretrian")
    assert wrong.returncode == 2 and "unknown command 'pretrian'" in wrong.stderr


def test_data_builds_shards_and_pretrain_launches_through_accelerate(tmp_path):
    shards = tmp_path / "shards"
    built = codegpt("data", "recipes/pretrain-tiny.yaml", "data.source=local", f"data.paths=[{EMAIL}]",
                    f"data.shard_dir={shards}", "data.val_fraction=0.2", "data.num_workers=1")
    assert built.returncode == 0, built.stderr
    assert json.loads((shards / "index.json").read_text())["splits"]["train"]["tokens"] > 0
    run = tmp_path / "run"
    trained = codegpt("pretrain", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "recipes/pretrain-tiny.yaml", "data.source=local",
                      f"data.paths=[{EMAIL}]", f"data.shard_dir={shards}", "data.val_fraction=0.2",
                      "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
                      "train.micro_batch_size=4", "train.batch_tokens=128", "train.max_steps=2",
                      "train.warmup_steps=1", "train.eval_tokens=128", "log.quality_samples=0",
                      "log.wandb=disabled", f"out_dir={run}")
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run / "run.json").read_text())["processes"] == 1 and (run / "final/model.safetensors").exists()
    assert "codegpt pretrain [launcher options] [recipe.yaml]" in codegpt("pretrain", "--help").stdout


def test_the_wheel_installs_one_top_level_package(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("codegpt-*.whl"))).namelist()
    assert {name.split("/")[0] for name in names} == {"codegpt", next(n for n in names if ".dist-info/" in n).split("/")[0]}
    assert {"codegpt/base/model.py", "codegpt/base/data/loader.py", "codegpt/serve/static/index.html",
            "codegpt/cli/__init__.py"} <= set(names)


def test_a_launched_command_refusing_its_input_is_one_line_and_exit_2(tmp_path):
    """`codegpt pretrain` goes through `accelerate launch`, which wraps a failed script in a
    traceback of its own: the user sees the script's one line and its exit code."""
    (tmp_path / "a-file").write_text("not a directory\n")
    refused = codegpt("pretrain", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "recipes/pretrain-tiny.yaml", f"out_dir={tmp_path / 'a-file'}")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"error: {tmp_path / 'a-file'}: exists and is not a directory")
