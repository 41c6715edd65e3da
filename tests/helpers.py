"""What several test files share: tiny model configs, an in-memory batch source, metrics readers."""

import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from codegpt.base.model import GPT, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    settings = dict(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    settings.update(overrides)
    return GPTConfig(**settings)


def varied_model(std: float = 1.0, **overrides) -> GPT:
    """A tiny model over the real vocabulary (its ids decode) with weights far from init, so that
    greedy text varies and equal outputs mean something."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**{"vocab_size": 100_352, "n_embd": 32, "n_head": 2, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
    return model


class ListBatches:
    """Windows of a fixed random token table, in order, with a saveable cursor."""

    def __init__(self, seed, rows=64, block=32, batch=4):
        self.table = torch.randint(0, 512, (rows, block + 1), generator=torch.Generator().manual_seed(seed))
        self.cursor, self.batch = 0, batch

    def next_batch(self):
        rows = self.table[torch.arange(self.cursor, self.cursor + self.batch) % len(self.table)]
        self.cursor += self.batch
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def losses(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(record):
    """A metrics line without its timings."""
    return {k: v for k, v in record.items() if k not in ("tokens_per_s", "step_s")}


def write_adapter(directory: Path, base, base_dir: Path, lora, seed: int) -> Path:
    """An adapter of `base` (saved at `base_dir`) with random factors large enough to change
    what it writes, as `codegpt sft` would leave it."""
    import copy

    from codegpt.base.provenance import weights_hash
    from codegpt.finetune.adapter import write_adapter_files
    from codegpt.finetune.lora import apply_lora

    model = copy.deepcopy(base)
    apply_lora(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    directory.mkdir(parents=True)
    write_adapter_files(directory, model, lora, str(base_dir), weights_hash(base.state_dict()))
    return directory


class CountPackedProducts(TorchDispatchMode):
    """How many products ran through weights prepacked for MKL (base/packed_linear.py) while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.mkl._mkl_linear.default
        return func(*args, **(kwargs or {}))
