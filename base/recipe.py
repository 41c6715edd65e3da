"""The pretraining recipe: the sections of `recipes/pretrain-*.yaml` as typed dataclasses.

`model` is the architecture (`GPTConfig`), `data` the corpus and its token shards, `train` the
optimisation schedule, `log` where metrics go. Fine-tuning recipes reuse these sections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from codegpt.base.errors import InvalidValue
from codegpt.base.fileio import special_file
from codegpt.base.footprint import memory_problem
from codegpt.base.model import GPTConfig


def validate_source(source: str, paths: list[str]) -> None:
    """A corpus's `source` and `paths` (shared by pretraining data and task data): files need a
    file, and every local path must exist and be a file or directory (a device or FIFO would never
    end or block)."""
    if source == "files" and not paths:
        raise InvalidValue("paths", "source 'files' needs at least one jsonl or parquet file")
    if source != "codeparrot":
        for path in paths:
            if not os.path.exists(os.path.expanduser(path)):
                raise InvalidValue("paths", f"{path} does not exist")
            if (kind := special_file(os.path.expanduser(path))) is not None:
                raise InvalidValue("paths", f"{path} is {kind}, not a file or directory")


@dataclass
class DataConfig:
    """Which documents to train on and where their token shards live."""

    # codeparrot: codeparrot/codeparrot-clean streamed from the Hub; local: .py files under
    # `paths` (default: this Python's standard library); files: jsonl/parquet with `content`.
    source: Literal["codeparrot", "local", "files"] = "codeparrot"
    paths: list[str] = field(default_factory=list)
    shard_dir: str = "data/shards/codeparrot"
    val_fraction: float = 0.005
    max_docs: int | None = None
    max_tokens: int | None = None
    num_workers: int | None = None  # tokenizer processes; None = every core
    # A shard ends at whichever bound comes first; both keep a shard's memory and file bounded.
    shard_docs: int = 50_000
    shard_tokens: int = 100_000_000
    max_file_bytes: int = 1 << 20  # larger files and records are skipped (counted as too_large)
    # Train the softmax over the ids the shards hold (and the special tokens) rather than all
    # 100,352: the standard library uses about 40% of them, and the head is most of a small
    # model's FLOPs. The model records them (model.active_vocab, its active_ids) and never
    # predicts another id.
    vocab_subset: bool = False
    # Fill-in-the-middle (base/data/fim.py): the share of training documents rearranged as PSM or SPM
    # when loaded, and the share of those in SPM order. Validation stays left to right.
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5

    def validate(self) -> None:
        for name in ("fim_rate", "fim_spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidValue(name, f"must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise InvalidValue("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        for name in ("max_docs", "max_tokens", "num_workers", "shard_docs", "shard_tokens", "max_file_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidValue(name, f"must be positive, got {value}")
        validate_source(self.source, self.paths)


@dataclass
class TrainConfig:
    """The optimisation schedule. Defaults are the seed's run (one A100)."""

    batch_tokens: int = 2**19  # tokens per optimizer step, reached by gradient accumulation
    micro_batch_size: int = 16  # sequences per forward pass on each process
    max_steps: int = 5912  # with time_budget_minutes: the most steps the budget may plan
    warmup_steps: int = 222
    # Minutes the training loop (evaluations included) may take: it times its first warm-up
    # steps and one evaluation, then fixes max_steps (see base/budget.py). None: max_steps.
    time_budget_minutes: float | None = None
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.01
    # adamw (the seed's), or muon: Muon for the blocks' matrices, AdamW for the rest (base/optimizers.py).
    optimizer: Literal["adamw", "muon"] = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # auto: the launcher's --mixed_precision if given, else bf16 on a GPU that has it, else fp32.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # auto: torch.compile on CUDA only. On CPU compiling costs about a minute up front (worth it
    # for long runs: bench/train_throughput.py measures the gain), so it is opt-in there.
    compile: Literal["auto"] | bool = "auto"
    seed: int = 1337
    eval_interval: int = 250
    eval_tokens: int = 2**20  # validation tokens per evaluation (a fixed sample)
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    resume: bool = True

    def validate(self) -> None:
        for name in ("batch_tokens", "micro_batch_size", "max_steps", "eval_interval", "eval_tokens",
                     "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise InvalidValue(name, f"must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise InvalidValue("warmup_steps", f"must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.time_budget_minutes is not None:
            if self.time_budget_minutes <= 0:
                raise InvalidValue("time_budget_minutes", f"must be positive, got {self.time_budget_minutes}")
            if self.warmup_steps < 3:
                raise InvalidValue("warmup_steps", f"a time budget times the first warm-up steps: needs at least "
                                                   f"3, got {self.warmup_steps}")
        if self.lr <= 0:
            raise InvalidValue("lr", f"must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise InvalidValue("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0:
            raise InvalidValue("weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise InvalidValue(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise InvalidValue("grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")


def accumulation_steps(train: TrainConfig, block_size: int, world_size: int = 1) -> int:
    """Micro-batches per optimizer step on each process: batch_tokens over micro_batch_size x
    block_size x processes, which must divide it (InvalidValue naming batch_tokens)."""
    per_step = train.micro_batch_size * block_size * world_size
    if train.batch_tokens % per_step:
        processes = f" x processes = {train.micro_batch_size} x {block_size} x {world_size}" if world_size > 1 else \
            f" = {train.micro_batch_size} x {block_size}"
        raise InvalidValue("batch_tokens", f"{train.batch_tokens} is not a multiple of micro_batch_size x block_size"
                                           f"{processes} = {per_step}")
    return train.batch_tokens // per_step


@dataclass
class LogConfig:
    wandb: Literal["disabled", "offline", "online"] = "offline"
    wandb_project: str = "codegpt"
    run_name: str | None = None
    log_interval: int = 10
    quality_samples: int = 20  # samples of the parse-rate report at the end of pretraining; 0 = none

    def validate(self) -> None:
        if self.log_interval <= 0:
            raise InvalidValue("log_interval", f"must be positive, got {self.log_interval}")
        if self.quality_samples < 0:
            raise InvalidValue("quality_samples", f"must be >= 0, got {self.quality_samples}")


@dataclass
class PretrainRecipe:
    out_dir: str = "checkpoints/pretrain-70m"
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        if self.model.active_vocab is not None and not self.data.vocab_subset:
            raise InvalidValue("model.active_vocab", "is set by pretraining from the data (data.vocab_subset: true); "
                                                     "leave it out")
        if (problem := memory_problem(self.model)) is not None:
            raise InvalidValue(f"model.{problem[0]}", problem[1])
        try:
            accumulation_steps(self.train, self.model.block_size)
        except InvalidValue as err:
            raise InvalidValue(f"train.{err.key}", err.message) from None
