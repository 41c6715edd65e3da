"""A time budget fixes the step count once, from timed warm-up steps, and a resumed run keeps it."""

import json
import shutil

import pytest
import torch

from codegpt.base import budget
from codegpt.base.errors import InvalidValue
from codegpt.base.model import GPT
from codegpt.base.recipe import LogConfig, PretrainRecipe, TrainConfig
from codegpt.base.run_dir import RunDirectory
from codegpt.base.train import Trainer, learning_rate, make_accelerator
from tests.helpers import ListBatches, comparable, losses, tiny_config


def test_plan_fits_steps_and_evaluations_in_what_is_left():
    # 60 s left at step 4: steps of 1 s, evaluations of 5 s every 10 steps and one at the end.
    plan = budget.plan(1.5, 30.0, 4, [9.0, 3.0, 1.0, 1.0], 5.0, 10, cap=1000)
    assert plan.step_s == 1.0  # the first half of the probe (cold pages, lazy set-up) is left out
    # To step 40: 36 steps + evaluations at 10, 20, 30 and 40 (the last one) = 36 + 20 = 56 s. To 41:
    # 37 + 5 evaluations (the final one at 41) = 62 s, past the 60 left.
    assert plan.max_steps == 40
    assert budget.plan(1.5, 30.0, 4, [1.0] * 4, 5.0, 10, cap=20).max_steps == 20
    assert budget.plan(0.1, 30.0, 4, [1.0] * 4, 5.0, 10, cap=20).max_steps == 4


@pytest.mark.parametrize("bad", [dict(time_budget_minutes=0.0), dict(time_budget_minutes=1.0, warmup_steps=2)])
def test_a_budget_needs_a_positive_time_and_a_warm_up_to_time(bad):
    with pytest.raises(InvalidValue):
        TrainConfig(**{"warmup_steps": 5, **bad}).validate()


def budget_run(out_dir, minutes, max_steps=40):
    train = TrainConfig(batch_tokens=128, micro_batch_size=4, max_steps=max_steps, warmup_steps=4, lr=3e-3,
                        min_lr=3e-4, eval_interval=5, eval_tokens=128, checkpoint_interval=2, keep_checkpoints=50,
                        time_budget_minutes=minutes)
    recipe = PretrainRecipe(out_dir=str(out_dir), model=tiny_config(), train=train,
                            log=LogConfig(wandb="disabled", log_interval=1))
    torch.manual_seed(0)
    val = ListBatches(seed=1, rows=8)
    accelerator = make_accelerator(train)
    with RunDirectory(out_dir, "pretrain", accelerator) as run_dir:
        trainer = Trainer(GPT(recipe.model), ListBatches(seed=0), lambda: [val.next_batch() for _ in range(2)], train,
                          recipe.log, run_dir, accelerator, recipe, block_size=32)
        return trainer.run(), trainer


def test_a_budgeted_run_ends_its_schedule_where_its_plan_ends(tmp_path):
    last, trainer = budget_run(tmp_path / "run", minutes=0.05)
    plan = json.loads((tmp_path / "run" / budget.BUDGET_FILE).read_text())
    assert 4 <= plan["max_steps"] <= 40 and last["step"] == plan["max_steps"]
    assert last["lr"] == pytest.approx(learning_rate(plan["max_steps"] - 1, trainer.train))
    if plan["max_steps"] > 4:
        assert learning_rate(plan["max_steps"], trainer.train) == pytest.approx(3e-4)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_a_resumed_run_takes_the_recorded_plan_not_a_new_one(tmp_path, monkeypatch):
    planned = budget.Plan(max_steps=9, step_s=0.1, eval_s=0.1, time_budget_minutes=1.0)
    monkeypatch.setattr(budget, "plan", lambda *args, **kwargs: planned)
    whole = tmp_path / "whole"
    budget_run(whole, minutes=1.0)
    records = losses(whole)
    assert max(r["step"] for r in records) == 9

    # Killed after the step-6 checkpoint; resumed with another budget, whose plan would differ.
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for path in RunDirectory(cut, "pretrain", None).checkpoints()[3:]:
        shutil.rmtree(path)
    shutil.rmtree(cut / "final")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 6))
    monkeypatch.setattr(budget, "plan", lambda *args, **kwargs: pytest.fail("a resumed run planned again"))
    last, _ = budget_run(cut, minutes=30.0)
    assert last["step"] == 9
    assert (cut / "final/model.safetensors").read_bytes() == (whole / "final/model.safetensors").read_bytes()
    assert [comparable(r) for r in losses(cut)] == [comparable(r) for r in records]


def test_a_run_killed_before_it_planned_times_the_rest_of_its_warm_up(tmp_path):
    budget_run(tmp_path / "run", minutes=None, max_steps=2)  # a checkpoint at step 2 of 4 warm-up steps
    last, _ = budget_run(tmp_path / "run", minutes=0.05)
    plan = json.loads((tmp_path / "run" / budget.BUDGET_FILE).read_text())
    assert last["step"] == plan["max_steps"] <= 40


def test_a_budget_on_a_run_past_its_warm_up_without_a_plan_is_refused_before_anything_is_written(tmp_path):
    from codegpt.base.errors import UserError

    budget_run(tmp_path / "run", minutes=None, max_steps=6)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="train.time_budget_minutes: .* step 6, past its 4 warm-up steps"):
        budget_run(tmp_path / "run", minutes=1.0)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
