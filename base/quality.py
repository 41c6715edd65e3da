"""How much Python a model writes: the share of samples that parse.

k samples from fixed code prompts, each cut at its last complete line, parsed with `ast`. Next to
validation loss (over every window of held-out files) it tells whether a small model learned the
language or only its token statistics.
"""

from __future__ import annotations

import ast
import math
from dataclasses import asdict

import torch

from codegpt.base.generate import Sampling, generate
from codegpt.base.data.loader import BatchLoader
from codegpt.base.model import GPT
from codegpt.base.tokenizer import Tokenizer

PROMPTS = ("def ", "class ", "import os\n\n\ndef ", "from typing import List\n\n\ndef ",
           "    def __init__(self", "import sys\n\n", "@property\ndef ", "for ")


def complete_lines(text: str) -> str:
    return text[: text.rfind("\n") + 1] if "\n" in text else ""


def parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return bool(text.strip())


def parse_rate(model: GPT, tokenizer: Tokenizer, k: int = 20, max_new_tokens: int = 128, seed: int = 0,
               temperature: float = 0.8, top_k: int = 50) -> dict:
    """Sample k programs (cycling through PROMPTS), cut each at its last complete line, and count
    those that parse. An indented prompt is parsed as the body of a class."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(k)]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    texts = [complete_lines(p + c) for p, c in zip(prompts, generate(model, tokenizer, prompts, sampling))]
    ok = [parses("class C:\n" + t if t.startswith(" ") else t) for t in texts]
    return {"samples": k, "parsable": sum(ok), "rate": sum(ok) / k, "sampling": asdict(sampling),
            "texts": [{"text": t, "parses": o} for t, o in zip(texts, ok)]}


def describe(report: dict, show: int = 2) -> str:
    lines = [f"{report['parsable']} of {report['samples']} samples parse as Python "
             f"(cut at the last complete line, temperature {report['sampling']['temperature']})"]
    for sample in report["texts"][:show]:
        lines += ["-" * 40 + (" parses" if sample["parses"] else " does not parse"), sample["text"].rstrip()]
    return "\n".join(lines)


@torch.no_grad()
def validation_loss(model: GPT, shard_dir: str, batch_size: int = 16) -> dict:
    """Mean loss per token over every window of the validation split (held-out files), in order."""
    loader = BatchLoader(shard_dir, "val", model.config.block_size, 1, shuffle=False)
    device = next(model.parameters()).device
    was_training, total, tokens = model.training, 0.0, 0
    model.eval()
    for first in range(0, loader.num_windows, batch_size):
        rows = [loader.next_batch() for _ in range(min(batch_size, loader.num_windows - first))]
        x, y = torch.cat([r[0] for r in rows]).to(device), torch.cat([r[1] for r in rows]).to(device)
        total += model(x, y).item() * y.numel()
        tokens += y.numel()
    model.train(was_training)
    return {"val_loss": total / tokens, "perplexity": math.exp(total / tokens), "tokens": tokens}
