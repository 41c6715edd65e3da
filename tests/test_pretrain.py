"""Pretraining through its command: a SIGKILLed run resumes to the same bits, two real DDP ranks
match one process with the same global batch, checkpoints (and a time budget's plan) cross world
sizes, the 70M recipe takes an optimizer step, and recipe errors stop before any work."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from codegpt.base.checkpoint import load_model
from codegpt.base.generate import Sampling, banned_ids, token_steps
from codegpt.base.data.shards import read_index
from codegpt.base.tokenizer import Tokenizer
from codegpt.base.run_dir import RunDirectory
from tests.test_run_dir import ONE_PROCESS, tree

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TWO_RANKS = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no"]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.0",
        "train.micro_batch_size=4", "train.batch_tokens=256", "train.warmup_steps=2", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.eval_interval=1000", "train.eval_tokens=256", "log.log_interval=1",
        "log.wandb=disabled", "log.quality_samples=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Overrides that point a recipe at small shards built from the standard library's email package."""
    shard_dir = tmp_path_factory.mktemp("shards")
    package = Path(sysconfig.get_paths()["stdlib"]) / "email"
    overrides = ["data.source=local", f"data.paths=[{package}]", f"data.shard_dir={shard_dir}",
                 "data.val_fraction=0.2", "data.num_workers=1"]
    result = subprocess.run([sys.executable, "-m", "codegpt.base.data", "recipes/pretrain-tiny.yaml", *overrides],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return overrides


def pretrain(*args, launcher=(sys.executable,), env=None, recipe="recipes/pretrain-tiny.yaml", **popen):
    command = [*launcher, str(ROOT / "base/pretrain.py"), str(ROOT / recipe), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          timeout=600, **popen)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run) if "loss" in r]


def test_sigkilled_run_resumes_bit_exactly(tmp_path, data):
    # With fill-in-the-middle on: its load-time draws must resume exactly too.
    common = [*data, *TINY, "model.dropout=0.1", "train.max_steps=12", "train.checkpoint_interval=3", "data.fim_rate=0.5"]
    whole = tmp_path / "whole"
    assert pretrain(*common, f"out_dir={whole}").returncode == 0

    killed = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "base/pretrain.py"), str(ROOT / "recipes/pretrain-tiny.yaml"),
               *common, f"out_dir={killed}"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once step 7 is logged: between the step-6 and step-9 checkpoints
        if (killed / "metrics.jsonl").exists() and any(r["step"] >= 7 for r in records(killed)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()

    resumed = pretrain(*common, f"out_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert (killed / "final/model.safetensors").read_bytes() == (whole / "final/model.safetensors").read_bytes()
    assert train_losses(killed) == train_losses(whole)
    assert [r["step"] for r in records(killed) if "loss" in r] == list(range(1, 13))


def test_two_ddp_ranks_match_one_process_and_checkpoints_cross_world_sizes(tmp_path, data):
    common = [*data, *TINY, "train.max_steps=3", "train.checkpoint_interval=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = pretrain(*common, f"out_dir={one}")
    assert single.returncode == 0, single.stderr
    double = pretrain(*common, f"out_dir={two}", launcher=TWO_RANKS, env={"ACCELERATE_USE_CPU": "1"})
    assert double.returncode == 0, double.stderr
    run = json.loads((two / "run.json").read_text())
    assert run["processes"] == 2 and run["accumulation"] == 1
    assert json.loads((one / "run.json").read_text())["accumulation"] == 2
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-4)

    # The 2-rank checkpoint continues in one process, and the 1-process one on two ranks.
    longer = [*common, "train.max_steps=5"]
    assert pretrain(*longer, f"out_dir={two}").returncode == 0
    cont = pretrain(*longer, f"out_dir={one}", launcher=TWO_RANKS, env={"ACCELERATE_USE_CPU": "1"})
    assert cont.returncode == 0, cont.stderr
    assert "resumed from" in cont.stdout
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-4)
    assert len(train_losses(two)) == 5


def test_a_budget_on_two_ranks_is_planned_once_and_a_resume_in_one_process_keeps_it(tmp_path, data):
    common = [*data, *TINY, "train.max_steps=24", "train.warmup_steps=4", "train.checkpoint_interval=4",
              "train.keep_checkpoints=10"]
    two = tmp_path / "two"
    double = pretrain(*common, "train.time_budget_minutes=0.1", f"out_dir={two}", launcher=TWO_RANKS,
                      env={"ACCELERATE_USE_CPU": "1"})
    assert double.returncode == 0, double.stderr
    plan = json.loads((two / "budget.json").read_text())
    assert double.stdout.count("time budget 0.1 min") == 1  # the main process plans; every rank follows
    steps = [r["step"] for r in records(two) if "loss" in r]
    assert 4 < plan["max_steps"] <= 24 and steps == list(range(1, plan["max_steps"] + 1))

    # Killed after the plan (made at the end of the 4-step warm-up) and its step-4 checkpoint; resumed
    # in one process with a budget that is already spent, it keeps the plan and takes the same steps.
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    shutil.rmtree(cut / "final")
    for path in RunDirectory(cut, "pretrain", None).checkpoints()[1:]:
        shutil.rmtree(path)
    resumed = pretrain(*common, "train.time_budget_minutes=0.001", f"out_dir={cut}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout and "time budget" not in resumed.stdout
    assert json.loads((cut / "budget.json").read_text()) == plan
    assert [r["step"] for r in records(cut) if "loss" in r] == steps
    assert train_losses(cut) == pytest.approx(train_losses(two), rel=1e-4)


def test_the_70m_recipe_takes_an_optimizer_step(tmp_path, data):
    out = tmp_path / "seed"
    result = pretrain(*data, "train.batch_tokens=1024", "train.micro_batch_size=1", "train.max_steps=1",
                      "train.warmup_steps=0", f"out_dir={out}", recipe="recipes/pretrain-70m.yaml")
    assert result.returncode == 0, result.stderr
    assert "69,560,064 parameters" in result.stdout
    (record,) = [r for r in records(out) if "loss" in r]
    assert 11.0 < record["loss"] < 12.0  # ln(100352) = 11.5 at initialisation
    assert json.loads((out / "final/config.json").read_text())["model"]["n_embd"] == 448
    assert "of 20 samples parse as Python" in result.stdout  # the quality report closes the run
    assert json.loads((out / "quality.json").read_text())["samples"] == 20


def test_recipe_errors_stop_before_any_work(tmp_path):
    result = pretrain("train.lrr=1e-3", f"out_dir={tmp_path / 'x'}")
    assert result.returncode == 2
    assert result.stderr == "error: <command line>: train.lrr: unknown key (did you mean train.lr?)\n"
    assert not (tmp_path / "x").exists()


def test_codeparrot_offline_fails_fast_with_the_way_out(tmp_path):
    started = time.time()
    result = pretrain(f"data.shard_dir={tmp_path / 'cp'}", f"out_dir={tmp_path / 'x'}",
                      recipe="recipes/pretrain-70m.yaml", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and time.time() - started < 60
    assert "data.source=local" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "cp").exists() and not (tmp_path / "x").exists()


def test_a_loss_that_turns_non_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data):
    out = tmp_path / "diverged"
    # lr 1e30: the first step's loss is fine, and its update leaves weights no forward survives.
    result = pretrain(*data, *TINY, "train.lr=1e30", "train.min_lr=0", "train.warmup_steps=0", "train.max_steps=6",
                      "train.checkpoint_interval=1", f"out_dir={out}")
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: step 2: the training loss is ") and "not finite" in last_line
    assert str(out / "step-000001") in last_line and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step-", "final"))) == ["step-000001"]


def test_resuming_another_model_is_refused_before_anything_is_written(tmp_path, data):
    out = tmp_path / "run"
    common = [*data, *TINY, "train.checkpoint_interval=1", f"out_dir={out}"]
    assert pretrain(*common, "train.max_steps=1", "train.warmup_steps=0").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = pretrain(*common, "train.max_steps=2", "model.n_layer=2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {out / 'recipe.yaml'}:")
    assert ": model.n_layer is 1 in the run, 2 now" in result.stderr
    assert "resume=false" not in result.stderr  # it would start over: never what a refusal suggests
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # Dropout is no part of the weights: a run may resume with another.
    resumed = pretrain(*common, "train.max_steps=2", "model.dropout=0.1")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr


def test_a_softmax_over_the_data_ids_is_recorded_with_the_model_and_never_sampled_outside(tmp_path, data):
    run = tmp_path / "run"
    result = pretrain(*data, *TINY, "data.vocab_subset=true", "train.max_steps=2", f"out_dir={run}")
    assert result.returncode == 0, result.stderr
    shard_dir = Path(next(o for o in data if o.startswith("data.shard_dir="))[len("data.shard_dir="):])
    held = set()
    for split in read_index(shard_dir)["splits"].values():
        for shard in split["shards"]:
            held |= set(np.unique(np.memmap(shard_dir / shard["file"], dtype="<u4", mode="r")).tolist())
    model = load_model(run / "final")
    tokenizer = Tokenizer()
    assert set(model.active_ids.tolist()) == held | set(tokenizer.special_ids.values())
    assert model.config.active_vocab == len(model.active_ids) < 20_000
    steps = token_steps(model.eval(), [tokenizer.encode("import")], Sampling(temperature=1.0, seed=0),
                        banned_ids(model, tokenizer, "cpu"), tokenizer.eot_id)
    assert {next(steps)[0] for _ in range(50)} <= set(model.active_ids.tolist())


def test_a_second_run_on_a_busy_out_dir_is_refused_and_killing_the_first_frees_it(tmp_path, data):
    out = tmp_path / "run"
    common = [*data, *TINY, "train.checkpoint_interval=2", "train.keep_checkpoints=100", f"out_dir={out}"]
    first = subprocess.Popen([sys.executable, str(ROOT / "base/pretrain.py"), str(ROOT / "recipes/pretrain-tiny.yaml"),
                              *common, "train.max_steps=100000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "step-000002").is_dir() and time.time() < deadline:
            time.sleep(0.1)
        second = pretrain(*common, "train.max_steps=4")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert second.stderr.startswith(f"error: {out}: in use by another run (pid {first.pid}: ")
    assert "base/pretrain.py" in second.stderr and "out_dir=" in second.stderr
    steps = [int(p.name[len("step-"):]) for p in RunDirectory(out, "pretrain", ONE_PROCESS).checkpoints()]
    third = pretrain(*common, f"train.max_steps={steps[-1] + 1}")  # no manual step: the kernel dropped the lock
    assert third.returncode == 0, third.stderr
    assert f"resumed from {out / f'step-{steps[-1]:06d}'}" in third.stdout and not (out / "run.lock").exists()
    logged = [r["step"] for r in records(out) if "loss" in r]
    assert logged == list(range(1, steps[-1] + 2))  # each step once, although the first run went further


def test_a_busy_out_dir_is_refused_on_every_rank(tmp_path, data):
    out = tmp_path / "run"
    with RunDirectory(out, "pretrain", ONE_PROCESS):
        before = tree(out)
        command = [*TWO_RANKS, str(ROOT / "base/pretrain.py"), str(ROOT / "recipes/pretrain-tiny.yaml"), *data, *TINY,
                   "train.max_steps=2", f"out_dir={out}"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                                env={**os.environ, "ACCELERATE_USE_CPU": "1"})
        assert tree(out) == before
    assert result.returncode != 0
    assert result.stderr.count(f"error: {out}: in use by another run (pid {os.getpid()}: ") == 2, result.stderr


def test_an_out_dir_no_run_may_write_is_refused_before_any_work(tmp_path, data):
    (tmp_path / "a-file").write_text("mine\n")
    for out_dir in (tmp_path / "a-file", tmp_path / "a-file" / "run", "/proc/codegpt-run"):
        result = pretrain(*data, *TINY, "train.max_steps=2", f"out_dir={out_dir}")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {out_dir}: ") and result.stderr.endswith(" (out_dir)\n")
    assert tree(tmp_path) == {"a-file": b"mine\n"}
