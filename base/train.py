"""The training loop shared by pretraining and fine-tuning.

One optimizer step = `accumulation` micro-batches on every process, reaching the recipe's batch
in tokens; its gradient, the logged loss and the validation loss are means over labelled targets
(packed SFT rows label only completions), not means of per-batch means. The recipe's optimizer
(`base/optimizers.py`: AdamW, or Muon with AdamW), linear warmup then cosine to `min_lr`,
gradient clipping, mixed precision and DDP through Accelerate, periodic validation, checkpoints
that resume exactly (weights, optimizer states, step, RNG states, data cursor), metrics to
`metrics.jsonl`, wandb and PNG plots.

A run stops with a UserError, writing nothing, when its loss or weights turn non-finite (the
last good checkpoint stays the newest), or when it would resume checkpoints made for another
model. Temporary names that a killed checkpoint save left behind are removed at the next start.

Callers supply the model, a training batch source (`next_batch()` giving inputs, targets and
optionally segment ids of packed examples; `state_dict()`, `load_state_dict()`; per rank) and a
function that yields this rank's validation batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from codegpt.base import budget
from codegpt.base.checkpoint import read_model_weights, write_model_files
from codegpt.base.provenance import provenance
from codegpt.base.wrappers import unwrap
from codegpt.base.recipe_loader import dump_recipe, read_yaml, to_dict
from codegpt.base.errors import InvalidValue, UserError
from codegpt.base.fileio import atomic_directory, atomic_write_text, recover, remove_temporaries
from codegpt.base.loss import IGNORE_INDEX
from codegpt.base.metrics import MetricsLog
from codegpt.base.optimizers import make_optimizers
from codegpt.base.recipe import LogConfig, TrainConfig, accumulation_steps

STATE_FILE = "training_state.pt"
# Recipe keys the optimizer states in a checkpoint depend on: resuming with another is refused.
OPTIMIZER_KEYS = ("train.optimizer",)
TRAINER_FILE = "trainer.json"
RECIPE_FILE = "recipe.yaml"
STEP_DIR = re.compile(r"^step-(\d+)$")
# The names whose atomic writes a killed run leaves as `.NAME.XXXXXXXX.tmp` in its directory.
RUN_TEMPORARIES = r"step-\d+|final|recipe\.yaml|run\.json|metrics\.jsonl|quality\.json|budget\.json"


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def make_accelerator(train: TrainConfig) -> Accelerator:
    """An Accelerator whose precision is the recipe's, or the launcher's when the recipe says
    `auto` (bf16 on a GPU that has it, fp32 elsewhere: bf16 matmuls crawl on most CPUs)."""
    precision = train.mixed_precision
    if precision == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher != "no":
            precision = launcher
        elif torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "no"
    accelerator = Accelerator(mixed_precision=precision)
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise; CPU training wants
        # every core, shared among the processes on this machine.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = int(os.environ.get("CODEGPT_THREADS", 0)) or max(1, cores // accelerator.num_processes)
        torch.set_num_threads(threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def validation_sample(source, train: TrainConfig, block_size: int, world_size: int, where: str) -> Callable:
    """The function that yields the same validation batches at every evaluation: about
    `eval_tokens` of `source` (a fixed shuffle across the whole split, rewound each time), this
    rank's share. `source` has `rows_per_epoch`, `rewind()` and `next_batch()`. A split without
    one batch per process is a UserError naming `where`, raised now rather than at the first
    evaluation."""
    available = source.rows_per_epoch // (train.micro_batch_size * world_size)
    if available == 0:
        raise UserError(f"{where}: the validation split has {source.rows_per_epoch} rows of {block_size} tokens, "
                        f"fewer than one batch of {train.micro_batch_size} per process")
    count = min(available, max(1, train.eval_tokens // (train.micro_batch_size * block_size * world_size)))

    def batches():
        source.rewind()
        for _ in range(count):
            yield source.next_batch()

    return batches


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.max_steps <= train.warmup_steps:
        return train.min_lr
    progress = min(1.0, (step - train.warmup_steps) / (train.max_steps - train.warmup_steps))
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete step checkpoints in `out_dir`, oldest first."""
    if not out_dir.is_dir():
        return []
    for path in out_dir.iterdir():
        if path.name.endswith(".old") and STEP_DIR.match(path.name[:-4]):
            recover(out_dir / path.name[:-4])
    steps = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps)]


def labelled_targets(batch: tuple) -> int:
    """How many targets of a batch (inputs, targets, ...) carry a label (not IGNORE_INDEX)."""
    return int((batch[1] != IGNORE_INDEX).sum())


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Trainer:
    model: torch.nn.Module
    train_batches: BatchSource
    val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    train: TrainConfig
    log: LogConfig
    out_dir: Path
    accelerator: Accelerator
    recipe: object  # written to the run directory as the recipe used
    block_size: int
    # How a checkpoint holds the weights: the whole model by default; a LoRA run writes its adapter.
    # Dotted recipe keys that the checkpoints depend on (the model's shape, the adapter's):
    # resuming with another value is refused.
    fixed_keys: tuple[str, ...] = ()
    write_weights: Callable[[Path, torch.nn.Module, dict], None] = lambda d, m, meta: write_model_files(d, m, meta=meta)
    read_weights: Callable[[Path, torch.nn.Module], None] = read_model_weights

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        acc = self.accelerator
        try:
            self.accumulation = accumulation_steps(self.train, self.block_size, acc.num_processes)
        except InvalidValue as err:
            raise UserError(f"train.{err.key}: {err.message}") from None
        _seed_everything(self.train.seed + acc.process_index)
        raw_model = self.model
        self.optimizers = make_optimizers(raw_model, self.train, acc.device)
        if len(self.optimizers) > 1 and acc.scaler is not None:
            # Accelerate's fp16 loss scaler updates its scale after each optimizer: twice a step here.
            raise UserError(f"train.optimizer: {self.train.optimizer} steps two optimizers, which fp16 loss "
                            "scaling does not support; use mixed_precision bf16 or no")
        if self.train.compile is True or (self.train.compile == "auto" and acc.device.type == "cuda"):
            self.model = torch.compile(self.model)
        self.model, *self.optimizers = acc.prepare(self.model, *self.optimizers)
        self.step = 0
        self.tokens_seen = 0
        self.metrics = MetricsLog(self.out_dir, enabled=acc.is_main_process)

    # --- checkpoints ---------------------------------------------------------------------------

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in out_dir, if any."""
        candidates = checkpoint_dirs(self.out_dir)
        if not candidates:
            return False
        path = candidates[-1]
        trainer_state = json.loads((path / TRAINER_FILE).read_text())
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        self.read_weights(path, unwrap(self.model))
        # Checkpoints from before train.optimizer hold one AdamW state under "optimizer".
        for optimizer, optimizer_state in zip(self.optimizers, state.get("optimizers") or [state["optimizer"]],
                                              strict=True):
            optimizer.load_state_dict(optimizer_state)
        rng = state["rng"]
        if len(rng) == self.accelerator.num_processes:
            _set_rng_state(rng[self.accelerator.process_index])
        else:  # another world size: exact per-rank streams cannot carry over; reseed deterministically
            _seed_everything(self.train.seed + self.accelerator.process_index + trainer_state["step"])
        self.step = trainer_state["step"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.train_batches.load_state_dict(trainer_state["data"])
        self.metrics.truncate_after(self.step)
        self.accelerator.print(f"resumed from {path} at step {self.step}")
        return True

    def save_checkpoint(self, final: bool = False) -> None:
        """out_dir/step-NNNNNN (weights + training state), the newest `keep_checkpoints` kept;
        at the end also out_dir/final (weights only)."""
        acc = self.accelerator
        # Every rank holds the same weights, so every rank stops here together.
        bad = next((name for name, p in unwrap(self.model).named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise UserError(f"step {self.step}: the weights are not finite ({bad}); stopped without saving "
                            f"them, {self._last_good()}")
        rng = gather_object([_rng_state()]) if acc.num_processes > 1 else [_rng_state()]
        if acc.is_main_process:
            model = unwrap(self.model)
            meta = provenance(step=self.step, tokens_seen=self.tokens_seen, run=str(self.out_dir))
            trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen,
                             "data": self.train_batches.state_dict(), "world_size": acc.num_processes}
            with atomic_directory(self.out_dir / f"step-{self.step:06d}") as tmp:
                self.write_weights(tmp, model, meta)
                torch.save({"optimizers": [o.state_dict() for o in self.optimizers], "rng": rng}, tmp / STATE_FILE)
                atomic_write_text(tmp / TRAINER_FILE, json.dumps(trainer_state, indent=2) + "\n")
            for old in checkpoint_dirs(self.out_dir)[: -self.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            if final:
                with atomic_directory(self.out_dir / "final") as tmp:
                    self.write_weights(tmp, model, meta)
            self.metrics.plot()
        acc.wait_for_everyone()

    def _last_good(self) -> str:
        saved = checkpoint_dirs(self.out_dir)
        return f"the last good checkpoint is {saved[-1]}" if saved else "and no checkpoint was saved before"

    # --- the loop ------------------------------------------------------------------------------

    def _on_device(self, batch: tuple) -> tuple:
        """(inputs, targets, segments or None): pretraining batches have no segments, packed SFT rows do."""
        x, y, *rest = (t.to(self.accelerator.device) for t in batch)
        return x, y, rest[0] if rest else None

    @torch.no_grad()
    def evaluate(self) -> float:
        """The mean loss over every labelled target of the validation batches on all ranks: each
        batch's mean weighs by its labelled targets, so a batch of short examples weighs less."""
        self.model.eval()
        total = torch.zeros((), device=self.accelerator.device)
        count = torch.zeros((), device=self.accelerator.device)
        for batch in self.val_batches():
            labelled = labelled_targets(batch)
            x, y, segments = self._on_device(batch)
            with self.accelerator.autocast():
                total += self.model(x, y, segments=segments).float() * labelled
            count += labelled
        self.model.train()
        total, count = self.accelerator.reduce(total, "sum"), self.accelerator.reduce(count, "sum")
        if count.item() == 0:
            raise UserError("validation split has no batch: lower train.micro_batch_size or add data")
        return (total / count).item()

    def _check_resumable(self) -> None:
        """Refuse, before anything is written, to resume a run whose checkpoints were made for
        another model or optimizer: name the first key of `fixed_keys` or OPTIMIZER_KEYS that
        differs from the run's recipe. A key the run's recipe lacks (it predates the key) had
        the key's default."""
        recipe_path = self.out_dir / RECIPE_FILE
        if not (self.train.resume and recipe_path.is_file() and checkpoint_dirs(self.out_dir)):
            return
        before, lines = read_yaml(recipe_path)
        now = to_dict(self.recipe)
        for key in (*self.fixed_keys, *OPTIMIZER_KEYS):
            old = _dotted(before, key) if key in lines else _default(self.recipe, key)
            new = _dotted(now, key)
            if old != new:
                line = f":{lines[key]}" if key in lines else ""
                raise UserError(f"{recipe_path}{line}: {key} is {old} in the run, {new} now (its checkpoints "
                                "are for the run's value: keep it, or start over with train.resume=false or "
                                "another out_dir)")
        # A budget is timed inside the warm-up: a run already past it with no plan cannot take one.
        step = json.loads((checkpoint_dirs(self.out_dir)[-1] / TRAINER_FILE).read_text())["step"]
        if (self.train.time_budget_minutes is not None and budget.read_plan(self.out_dir) is None
                and step >= self.train.warmup_steps):
            raise UserError(f"train.time_budget_minutes: the run in {self.out_dir} is at step {step}, past its "
                            f"{self.train.warmup_steps} warm-up steps, and has no budget plan ({budget.BUDGET_FILE}); "
                            "a budget times warm-up steps: resume without it, or start over with "
                            "train.resume=false or another out_dir")

    def run(self) -> dict:
        acc, train = self.accelerator, self.train
        self._check_resumable()
        if acc.is_main_process:
            remove_temporaries(self.out_dir, RUN_TEMPORARIES)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_recipe(self.recipe, self.out_dir / RECIPE_FILE)
            atomic_write_text(self.out_dir / "run.json", json.dumps(
                provenance(processes=acc.num_processes, device=str(acc.device), mixed_precision=acc.mixed_precision,
                           accumulation=self.accumulation, threads=torch.get_num_threads()), indent=2) + "\n")
        if train.resume:
            self.resume()
        probe_end = self._start_budget()
        self.metrics.start_wandb(self.log, self.recipe, resume=self.step > 0)
        tokens_per_step = self.accumulation * train.micro_batch_size * self.block_size * acc.num_processes
        acc.print(f"{unwrap(self.model).num_params():,} parameters | {acc.num_processes} process(es) "
                  f"on {acc.device} | {self.accumulation} micro-batches of {train.micro_batch_size}x{self.block_size} "
                  f"per step = {tokens_per_step:,} tokens | precision {acc.mixed_precision}")
        self.model.train()
        last, step_times, started = {}, [], time.perf_counter()
        # Closed on the way out of an error too, so that the error's line is not drawn over.
        with tqdm(total=self.train.max_steps, initial=self.step, disable=not acc.is_main_process,
                  dynamic_ncols=True, unit="step") as bar:
            while self.step < self.train.max_steps:
                last = self._step(tokens_per_step, bar)
                step_times.append(last["step_s"])
                if self.step == probe_end:
                    self._plan_budget(time.perf_counter() - started, step_times)
                    bar.total = self.train.max_steps
                    bar.refresh()
        self.metrics.finish()
        return last

    def _start_budget(self) -> int | None:
        """With a time budget: take the plan a resumed run recorded, or return the step after
        which to plan (None when there is nothing to plan). `_check_resumable` has refused a run
        past its warm-up without a plan."""
        if self.train.time_budget_minutes is None:
            return None
        recorded = budget.read_plan(self.out_dir) if self.step > 0 else None
        if recorded is not None:
            self.train = replace(self.train, max_steps=recorded.max_steps)
            return None
        # A run killed before it planned times what is left of its warm-up.
        return min(self.step + budget.probe_length(self.train.warmup_steps), self.train.warmup_steps)

    def _plan_budget(self, elapsed_s: float, step_times: list[float]) -> None:
        """Fix max_steps from the probe's step times and one timed evaluation (the main process
        decides and every rank follows), and record the plan before any later checkpoint."""
        started = time.perf_counter()
        val = self.evaluate()
        eval_s = time.perf_counter() - started
        self.metrics.log({"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                          "tokens": self.tokens_seen})
        plan = budget.plan(self.train.time_budget_minutes, elapsed_s + eval_s, self.step, step_times, eval_s,
                           self.train.eval_interval, cap=self.train.max_steps)
        plan = broadcast_object_list([plan])[0]
        if self.accelerator.is_main_process:
            budget.write_plan(self.out_dir, plan)
        self.train = replace(self.train, max_steps=plan.max_steps)
        self.accelerator.print(f"time budget {plan.time_budget_minutes:g} min: {plan.step_s:.2f} s a step, "
                               f"{plan.eval_s:.1f} s an evaluation -> {plan.max_steps} steps")
        if self.step == plan.max_steps:  # the budget is spent: this step is the last
            self.save_checkpoint(final=True)

    def _step(self, tokens_per_step: int, bar: tqdm) -> dict:
        """One optimizer step, then its logging, evaluation and checkpoint; the step's record."""
        acc, train = self.accelerator, self.train
        started = time.perf_counter()
        lr = learning_rate(self.step, train)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        # The step's gradient is the mean over every labelled target of every rank's
        # micro-batches: each micro-batch's mean loss weighs by its share of the step's targets,
        # whose count all ranks need before their first backward (one all-reduce, batches drawn
        # ahead). DDP then averages over ranks, hence the factor of num_processes.
        batches = [self.train_batches.next_batch() for _ in range(self.accumulation)]
        counts = [labelled_targets(batch) for batch in batches]
        step_targets = sum(counts)
        if acc.num_processes > 1:
            step_targets = int(acc.reduce(torch.tensor(step_targets, device=acc.device), "sum").item())
        loss_sum = torch.zeros((), device=acc.device)
        for micro, (batch, labelled) in enumerate(zip(batches, counts)):
            x, y, segments = self._on_device(batch)
            # DDP needs to all-reduce gradients only once per optimizer step.
            sync = micro == self.accumulation - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                with acc.autocast():
                    loss = self.model(x, y, segments=segments)
                # A division, so that equal counts (pretraining) divide by exactly the
                # accumulation, bit for bit a plain mean over micro-batches. A micro-batch
                # without labels has a zero loss and a zero gradient.
                acc.backward(loss / (step_targets / (acc.num_processes * labelled)) if labelled else loss)
            loss_sum += loss.detach().float() * labelled
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), train.grad_clip) if train.grad_clip > 0 else None
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens_per_step
        loss_mean = (acc.reduce(loss_sum, "sum") / max(step_targets, 1)).item()
        if not math.isfinite(loss_mean):  # the same on every rank: all stop, before any checkpoint
            raise UserError(f"step {self.step}: the training loss is {loss_mean} (not finite); stopped, "
                            f"{self._last_good()} (a lower train.lr may help)")
        elapsed = time.perf_counter() - started
        last = {"step": self.step, "loss": loss_mean, "lr": lr, "tokens": self.tokens_seen,
                "tokens_per_s": tokens_per_step / elapsed, "step_s": elapsed,
                "grad_norm": float(grad_norm) if grad_norm is not None else None}
        if self.step % self.log.log_interval == 0 or self.step == 1 or self.step == train.max_steps:
            self.metrics.log(last)
        bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:,.0f}", refresh=False)
        bar.update(1)
        if self.step % train.eval_interval == 0 or self.step == train.max_steps:
            val = self.evaluate()
            self.metrics.log({"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                              "tokens": self.tokens_seen})
            last["val_loss"] = val
            bar.write(f"step {self.step}: train loss {loss_mean:.4f}, val loss {val:.4f}, "
                      f"val ppl {math.exp(min(val, 50.0)):.2f}")
        if self.step % train.checkpoint_interval == 0 or self.step == train.max_steps:
            self.save_checkpoint(final=self.step == train.max_steps)
        return last


def _default(recipe, key: str):
    """The default of a dotted recipe key (`train.optimizer` -> TrainConfig's `optimizer`)."""
    *path, name = key.split(".")
    section = recipe
    for part in path:
        section = getattr(section, part)
    return next(f.default for f in fields(section) if f.name == name)


def _dotted(data: dict, key: str):
    """The value at a dotted key of nested mappings, or None where a part is missing."""
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
