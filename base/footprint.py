"""How much memory a model's parameters take, checked before they are allocated.

A mistyped size (`model.n_layer=1000000`) would otherwise die minutes later in the allocator, or
take the machine into swap. The count is computed from the config, not by building the model.
"""

from __future__ import annotations

import dataclasses
import os

from codegpt.base.model import GPTConfig

SIZE_KEYS = ("n_layer", "n_embd", "vocab_size", "block_size")


def parameter_count(config: GPTConfig) -> int:
    """What `GPT(config).num_params()` returns (the tied head counted once)."""
    width, bias = config.n_embd, int(config.bias)
    # Per block: two LayerNorms, c_attn (3C x C), attn c_proj (C x C), c_fc (4C x C), mlp c_proj (C x 4C).
    block = 12 * width * width + 2 * width * (1 + bias) + bias * (3 + 1 + 4 + 1) * width
    embeddings = (config.vocab_size + config.block_size) * width
    return config.n_layer * block + embeddings + width * (1 + bias)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def _size(n: float) -> str:
    return f"{n / 2**40:,.1f} TiB" if n >= 2**40 else f"{n / 2**30:,.1f} GiB"


def memory_problem(config: GPTConfig) -> tuple[str, str] | None:
    """(the size key to blame, why) when the parameters alone exceed this machine's memory, else
    None. Models are built on the CPU first, so its memory bounds every device. The key blamed is
    the one that, back at its default, shrinks the model most: where a typo most likely is."""
    total = physical_memory()
    need = parameter_count(config) * 4  # float32: what GPT() allocates, before any cast or optimizer state
    if total is None or need <= total:
        return None
    default = GPTConfig()
    key = min(SIZE_KEYS, key=lambda k: parameter_count(dataclasses.replace(config, **{k: getattr(default, k)})))
    return key, (f"{getattr(config, key):,} makes {parameter_count(config):,} parameters, {_size(need)} as float32, "
                 f"more than this machine's {_size(total)} of memory")
