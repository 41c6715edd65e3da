"""The training loop shared by pretraining and fine-tuning.

One optimizer step = `accumulation` micro-batches on every process, reaching the recipe's batch
in tokens; its gradient, the logged loss and the validation loss are means over labelled targets
(packed SFT rows label only completions), not means of per-batch means. The recipe's optimizer
(`base/optimizers.py`: AdamW, or Muon with AdamW), linear warmup then cosine to `min_lr`,
gradient clipping, mixed precision and DDP through Accelerate, periodic validation, checkpoints
that resume exactly (weights, optimizer states, step, RNG states, data cursor), metrics to
`metrics.jsonl`, wandb and PNG plots.

A run stops with a UserError, writing nothing, when its loss or weights turn non-finite, or
when a checkpoint save finds the disk full (the last good checkpoint stays the newest, the save's
temporaries removed). What a run directory holds, and whether a run may resume from it, is
base/run_dir.py's job.

On a GPU the batches go to the device from pinned memory without the host waiting (`to_device`),
and the next step's batches are drawn while the GPU works on this one, so data loading overlaps
the step. Under torch.compile the model compiles twice, once each: the training step (forward
and backward, for the one batch shape every loader gives: micro_batch_size x block_size), and at
the first evaluation the forward without gradients in eval mode (dynamo guards on grad mode and on
the module's training flag; that graph saves no activations and drops no units). Batches of
another shape would compile again; none come.

Callers supply the model, a training batch source (`next_batch()` giving inputs, targets and
optionally segment ids of packed examples; `state_dict()`, `load_state_dict()`; per rank), a
function that yields this rank's validation batches, and the open RunDirectory.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from codegpt.base import budget
from codegpt.base.checkpoint import read_model_weights, write_model_files
from codegpt.base.provenance import provenance
from codegpt.base.run_dir import RunDirectory, decided_on_main
from codegpt.base.wrappers import unwrap
from codegpt.base.errors import InvalidValue, UserError
from codegpt.base.loss import IGNORE_INDEX
from codegpt.base.metrics import MetricsLog
from codegpt.base.optimizers import make_optimizers
from codegpt.base.recipe import LogConfig, TrainConfig, accumulation_steps

# Recipe keys the optimizer states in a checkpoint depend on: resuming with another is refused.
OPTIMIZER_KEYS = ("train.optimizer",)


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict: ...  # a copy: the loop draws a step ahead and keeps the cursor before it
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


def to_device(batch: tuple, device: torch.device) -> tuple:
    """A batch's tensors on `device`. To a GPU they go from pinned memory with non-blocking
    copies: the copy is queued behind the work already queued and the host goes on (PyTorch's
    pinned-memory cache keeps each buffer until its copy is done). On a CPU they stay as they are."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


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
    run_dir: RunDirectory
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
        self.out_dir = self.run_dir.path
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
        # The next step's batches, drawn ahead, and the data cursor after this step's (what a checkpoint holds).
        self._drawn: tuple | None = None
        self.data_state = self.train_batches.state_dict()

    # --- checkpoints ---------------------------------------------------------------------------

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at `path` (checked whole by the run directory): weights,
        optimizer states, RNG states, step and data cursor, in memory."""
        trainer_state, state = self.run_dir.read_checkpoint(path)
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
        self.data_state = self.train_batches.state_dict()

    def save_checkpoint(self, final: bool = False) -> None:
        """out_dir/step-NNNNNN (weights + training state), the newest `keep_checkpoints` kept;
        at the end also out_dir/final (weights only)."""
        acc = self.accelerator
        # Every rank holds the same weights, so every rank stops here together.
        bad = next((name for name, p in unwrap(self.model).named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise UserError(f"step {self.step}: the weights are not finite ({bad}); stopped without saving "
                            f"them, {self.run_dir.last_good()}")
        rng = gather_object([_rng_state()]) if acc.num_processes > 1 else [_rng_state()]
        model = unwrap(self.model)
        meta = provenance(step=self.step, tokens_seen=self.tokens_seen, run=str(self.out_dir))
        trainer_state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.data_state,
                         "world_size": acc.num_processes}
        weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

        def write():
            self.run_dir.write_checkpoint(
                self.step, lambda directory: self.write_weights(directory, model, meta), weights_bytes,
                {"optimizers": [o.state_dict() for o in self.optimizers], "rng": rng}, trainer_state,
                keep=self.train.keep_checkpoints, final=final)
            self.metrics.plot()

        decided_on_main(acc, write)

    # --- the loop ------------------------------------------------------------------------------

    def _on_device(self, batch: tuple) -> tuple:
        """(inputs, targets, segments or None): pretraining batches have no segments, packed SFT rows do."""
        x, y, *rest = to_device(batch, self.accelerator.device)
        return x, y, rest[0] if rest else None

    def _draw(self) -> tuple[list, list, dict]:
        """A step's micro-batches (copies to the device queued), their labelled targets, and the
        data cursor after them."""
        batches = [self.train_batches.next_batch() for _ in range(self.accumulation)]
        counts = [labelled_targets(batch) for batch in batches]
        return [self._on_device(batch) for batch in batches], counts, self.train_batches.state_dict()

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

    def run(self) -> dict:
        acc, train = self.accelerator, self.train
        checkpoint = self.run_dir.check_resume(self.recipe, (*self.fixed_keys, *OPTIMIZER_KEYS), train)
        if checkpoint is not None:
            self.resume(checkpoint)
        self.run_dir.start(self.recipe, resuming=checkpoint is not None, processes=acc.num_processes,
                           device=str(acc.device), mixed_precision=acc.mixed_precision,
                           accumulation=self.accumulation, threads=torch.get_num_threads())
        if checkpoint is not None:
            self.metrics.truncate_after(self.step)
            acc.print(f"resumed from {checkpoint} at step {self.step}")
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
        if not last and decided_on_main(acc, lambda: not self.run_dir.final.exists()):
            self.save_checkpoint(final=True)  # resumed at its end: the save of final/ was cut short
        self.metrics.finish()
        return last

    def _start_budget(self) -> int | None:
        """With a time budget: take the plan a resumed run recorded, or return the step after
        which to plan (None when there is nothing to plan). `RunDirectory.check_resume` has refused a run
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
        batches, counts, self.data_state = self._drawn or self._draw()
        self._drawn = None
        step_targets = sum(counts)
        if acc.num_processes > 1:
            step_targets = int(acc.reduce(torch.tensor(step_targets, device=acc.device), "sum").item())
        loss_sum = torch.zeros((), device=acc.device)
        for micro, ((x, y, segments), labelled) in enumerate(zip(batches, counts)):
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
        if self.step + 1 < train.max_steps:  # while the GPU works on this step; `.item()` below waits for it
            self._drawn = self._draw()
        self.step += 1
        self.tokens_seen += tokens_per_step
        loss_mean = (acc.reduce(loss_sum, "sum") / max(step_targets, 1)).item()
        if not math.isfinite(loss_mean):  # the same on every rank: all stop, before any checkpoint
            raise UserError(f"step {self.step}: the training loss is {loss_mean} (not finite); stopped, "
                            f"{self.run_dir.last_good()} (a lower train.lr may help)")
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
