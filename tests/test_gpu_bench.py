"""The GPU bench on this CPU: the preflight's smoke run passes (or skips, where only CUDA can
tell) every check but the pretraining command's (minutes on 2 cores; tests/test_pretrain.py runs
the command with its quality samples); a check that
fails, hangs past its limit (with a process it started) or dies is reported FAIL and stops none of
the others; the command's shards hold every validation batch, whatever fraction that takes, and a
split without one window says which fraction to raise."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from codegpt.base.data.loader import BatchLoader
from codegpt.base.errors import UserError
from bench import gpu_preflight
from bench.common import ROOT, SMOKE, local_shards, validation_windows


def test_the_smoke_preflight_passes_or_skips_each_check(tmp_path):
    checks = [name for name in gpu_preflight.CHECKS if name != "pretrain_command"]
    command = [sys.executable, "-m", "bench.gpu", "--preflight", "--smoke", "--sections", "none", "--out",
               str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--checks", ",".join(checks)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["check"]: row for row in json.loads((tmp_path / "out" / "preflight.json").read_text())["checks"]}
    assert sorted(rows) == sorted(checks)
    failed = {name: row["detail"] for name, row in rows.items() if row["status"] not in ("PASS", "SKIP")}
    assert not failed, failed
    assert rows["decode_graph_capture"]["status"] == "SKIP"  # no CUDA here; every other check runs
    assert all(row["status"] == "PASS" for name, row in rows.items() if name != "decode_graph_capture")
    assert "aot_eager" in rows["train_step"]["detail"] and "fixed-shape step" in rows["decode_batch"]["detail"]
    summary = done.stdout.splitlines()[-1]
    assert summary.startswith(f"preflight: {len(checks) - 1} PASS, 0 FAIL, 1 SKIP")


def passes(setup):
    """a check that passes"""
    return "fine"


def skips(setup):
    """a check this machine cannot run"""
    raise gpu_preflight.Skip("needs what this machine lacks")


def raises(setup):
    """a check that meets an error"""
    raise ValueError("a bad value")


def hangs(setup):
    """a check that never ends, with a process of its own"""
    child = subprocess.Popen(["sleep", "600"])
    (setup.work / "grandchild.pid").write_text(str(child.pid))
    time.sleep(600)


def dies(setup):
    """a check whose process is killed"""
    os.kill(os.getpid(), signal.SIGKILL)


def is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_a_check_that_fails_hangs_or_dies_stops_none_of_the_others(tmp_path):
    setup = gpu_preflight.Setup(torch.device("cpu"), SMOKE, "recipes/pretrain-tiny.yaml", tmp_path / "out",
                                tmp_path / "work")
    checks = {"hangs": (hangs, 3), "raises": (raises, 30), "dies": (dies, 30), "skips": (skips, 30),
              "passes": (passes, 30)}
    rows = {row["check"]: row for row in gpu_preflight.preflight(setup, "# test", checks, jobs=2)}
    assert {name: row["status"] for name, row in rows.items()} == \
        {"hangs": "FAIL", "raises": "FAIL", "dies": "FAIL", "skips": "SKIP", "passes": "PASS"}
    assert rows["hangs"]["detail"] == "stopped at its limit of 3 s"
    assert rows["raises"]["detail"] == "ValueError: a bad value"
    assert 'raise ValueError("a bad value")' in rows["raises"]["output"]  # the traceback's end
    assert rows["dies"]["detail"] == "its process died (exit code -9)"
    assert rows["skips"]["detail"] == "needs what this machine lacks" and rows["passes"]["detail"] == "fine"
    assert rows["passes"]["what"] == "a check that passes"
    grandchild = int((tmp_path / "work" / "grandchild.pid").read_text())
    deadline = time.monotonic() + 10
    while not is_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert is_gone(grandchild)  # stopped with the check that started it
    written = json.loads((tmp_path / "out" / "preflight.json").read_text())["checks"]
    assert [row["check"] for row in written] == list(rows)
    assert "| passes | a check that passes | PASS |" in (tmp_path / "out" / "preflight.md").read_text()


def test_the_command_shards_hold_every_validation_batch_whatever_fraction_that_takes(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(300):
        lines = [f"def function_{i}_{j}(value):\n    return value * {i * 31 + j} + {j}\n" for j in range(6)]
        (corpus / f"module_{i}.py").write_text("\n\n".join(lines))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        out_dir: {tmp_path / "run"}
        model: {{block_size: 32, n_layer: 1, n_head: 2, n_embd: 32, dropout: 0.0}}
        data: {{source: local, paths: [{corpus}], shard_dir: {tmp_path / "unused"}}}
        train: {{batch_tokens: 128, micro_batch_size: 4, max_steps: 3, warmup_steps: 1}}
        """))
    needed = 4096 // (4 * 32) * 4  # every batch of an evaluation over 4,096 tokens
    shards = local_shards(str(recipe), tmp_path / "work", eval_tokens=4096, fraction=0.01)
    assert validation_windows(tmp_path / "work" / "shards-0", 32) < needed  # 0.01 fell short here
    assert shards.val_fraction > 0.01 and shards.val_rows >= needed
    assert validation_windows(shards.shard_dir, 32) == shards.val_rows
    assert f"data.val_fraction={shards.val_fraction:.6g}" in shards.overrides
    assert f"data.shard_dir={shards.shard_dir}" in shards.overrides
    # A run given a split without a single window is told which fraction to raise.
    with pytest.raises(UserError, match="the val split has no window of 1000001 tokens; add data, raise "
                                        r"data\.val_fraction or lower model\.block_size"):
        BatchLoader(str(shards.shard_dir), "val", 1_000_000, 1)
