"""The fine-tuning recipe (recipes/docstring.yaml, recipes/bugfix.yaml and tiny variants)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from codegpt.base.errors import InvalidValue
from codegpt.base.recipe import LogConfig, TrainConfig
from codegpt.finetune.lora import LoRAConfig
from codegpt.tasks.registry import TaskConfig


@dataclass
class SFTRecipe:
    out_dir: str = "checkpoints/docstring"
    base: str = "checkpoints/pretrain-70m/final"  # ours, a nanoGPT .pt or a Hugging Face GPT-2 directory
    method: Literal["lora", "full"] = "lora"
    block_size: int | None = None  # packed row length; None = the base model's context
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        if self.block_size is not None and self.block_size <= 0:
            raise InvalidValue("block_size", f"must be positive, got {self.block_size}")
