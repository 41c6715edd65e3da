"""A run's step count fixed from a time budget (`train.time_budget_minutes`).

The run times its first steps, all inside the learning-rate warm-up (whose schedule does not
depend on the step count), and one evaluation. The first steps of a run are slower than the rest
(cold pages of the shards, the allocator growing: 1.1-1.3 s against 0.7-1.0 s on a 2-core CPU),
so only the second half of the probe counts. From those it fixes `max_steps` so that the
training loop, its evaluations included, ends when the budget does, and the cosine decay ends
with it. `recipe.train.max_steps` stays an upper bound. The plan is written to the run directory
(`budget.json`) before any later checkpoint, and a resumed run reads it instead of timing again,
so a run killed and resumed takes exactly the steps, and the schedule, of one that was not.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from codegpt.base.errors import UserError
from codegpt.base.fileio import atomic_write_text

BUDGET_FILE = "budget.json"
# Steps whose times set the plan, after as many that warm up.
PROBE_STEPS = 10


@dataclass
class Plan:
    max_steps: int
    step_s: float  # median seconds per optimizer step over the probe's second half
    eval_s: float  # seconds of one evaluation
    time_budget_minutes: float


def probe_length(warmup_steps: int) -> int:
    """The steps a budgeted run times before it plans: inside the warm-up, at most 2 x PROBE_STEPS."""
    return min(warmup_steps, 2 * PROBE_STEPS)


def plan(budget_minutes: float, elapsed_s: float, step: int, step_times: list[float], eval_s: float,
         eval_interval: int, cap: int) -> Plan:
    """The largest step count whose remaining steps and evaluations (one every `eval_interval`
    steps and one at the end) fit in what is left of the budget; at least `step`, at most `cap`."""
    step_s = statistics.median(step_times[len(step_times) // 2:])
    left = budget_minutes * 60 - elapsed_s

    def cost(steps: int) -> float:
        evaluations = steps // eval_interval - step // eval_interval + (steps % eval_interval != 0)
        return (steps - step) * step_s + evaluations * eval_s

    steps = min(cap, step + max(0, int(left / step_s)))
    while steps > step and cost(steps) > left:
        steps -= 1
    return Plan(max_steps=steps, step_s=step_s, eval_s=eval_s, time_budget_minutes=budget_minutes)


def write_plan(out_dir: Path, budget: Plan) -> None:
    atomic_write_text(out_dir / BUDGET_FILE, json.dumps(asdict(budget), indent=2) + "\n")


def read_plan(out_dir: Path) -> Plan | None:
    path = out_dir / BUDGET_FILE
    if not path.is_file():
        return None
    try:
        return Plan(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"{path}: not a budget plan this version wrote ({err}); start over with "
                        "train.resume=false or another out_dir") from None
