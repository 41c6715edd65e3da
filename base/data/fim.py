"""Fill-in-the-middle training data (Bavarian et al. 2022, "Efficient Training of Language Models
to Fill in the Middle"), made from plain windows of token shards as they are loaded.

Each document of a window (the runs of tokens between <|endoftext|> tokens, a document cut by the
window's edge included) is, with probability `rate`, cut at two points drawn uniformly and
rearranged, with probability `spm_rate` in SPM order and otherwise in PSM order:

    PSM: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
    SPM: <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle   (the paper's SPM variant)

The rest stay left to right. The cuts fall between tokens, as in Megatron-LM's and StarCoder's
load-time transform, not between characters as in the paper: the shards hold tokens, and
decoding and re-encoding every window would cost more than the training step on a CPU. At
inference the prefix and suffix are encoded apart, so the hole also falls between tokens there.
Three sentinels per rearranged document make the window longer; it is cut back to its length at
the end, as Megatron-LM does.

The draws come from a generator seeded by the training seed and the window's place in the
loader's global order, so the transform is the same whatever the number of processes and after
a resume, and changing the rates needs no new shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codegpt.base.tokenizer import EOT, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, Tokenizer


@dataclass(frozen=True)
class FimTokens:
    eot: int
    prefix: int
    middle: int
    suffix: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "FimTokens":
        ids = tokenizer.special_ids
        return cls(ids[EOT], ids[FIM_PREFIX], ids[FIM_MIDDLE], ids[FIM_SUFFIX])


@dataclass(frozen=True)
class Fim:
    """What the loader applies: the recipe's rates and the tokenizer's sentinels."""

    rate: float
    spm_rate: float
    tokens: FimTokens


def rearrange(document: np.ndarray, rng: np.random.Generator, spm_rate: float, tokens: FimTokens) -> np.ndarray:
    """One document in PSM or SPM order, cut at two points drawn uniformly in [0, len]."""
    first, second = np.sort(rng.integers(0, len(document) + 1, size=2))
    prefix, middle, suffix = document[:first], document[first:second], document[second:]
    if rng.random() < spm_rate:
        parts = [[tokens.prefix, tokens.suffix], suffix, [tokens.middle], prefix, middle]
    else:
        parts = [[tokens.prefix], prefix, [tokens.suffix], suffix, [tokens.middle], middle]
    return np.concatenate([np.asarray(p, dtype=document.dtype) for p in parts])


def fim_window(window: np.ndarray, rng: np.random.Generator, rate: float, spm_rate: float,
               tokens: FimTokens) -> np.ndarray:
    """`window` with each of its documents rearranged with probability `rate`; same length."""
    ends = np.flatnonzero(window == tokens.eot)
    pieces, start = [], 0
    for end in [*ends, len(window)]:
        document = window[start:end]
        if len(document) and rng.random() < rate:
            document = rearrange(document, rng, spm_rate, tokens)
        pieces.append(document)
        if end < len(window):
            pieces.append(window[end : end + 1])
        start = end + 1
    return np.concatenate(pieces)[: len(window)]


def window_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the window at global loader position `position` (epochs included)."""
    return np.random.default_rng([seed, 0x46494D, position])
