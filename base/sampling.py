"""Sampling options and the draw of one token from next-token logits.

`Sampling` holds what a request asks for (temperature, top-k, top-p, stop strings, max new
tokens, seed) and checks it; `sample_next` picks the next token of a row; `Sampler` is one
sequence's options with its own random generator, so a seeded sequence draws the same tokens
whatever else is decoded beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from codegpt.base.errors import UserError

# Below this, logits / temperature overflow float32 into inf and NaN; such a temperature means
# greedy, which is temperature 0.
MIN_TEMPERATURE = 1e-4
# torch.Generator takes seeds below 2**64; derived seeds (seed + sample index) stay under it.
MAX_SEED = 2**63 - 1


class BadOption(UserError):
    """A sampling option out of range. `field` names it: the server answers 400 naming the
    field, the command line names the flag."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy; else at least MIN_TEMPERATURE
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # 0 to MAX_SEED; None draws a fresh one

    def validate(self) -> None:
        """BadOption naming the first bad option."""
        if self.max_new_tokens <= 0:
            raise BadOption("max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise BadOption("temperature", f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                                           f"got {self.temperature:g}")
        if self.top_k is not None and self.top_k <= 0:
            raise BadOption("top_k", f"must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise BadOption("top_p", f"must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise BadOption("stop", "stop strings must not be empty")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise BadOption("seed", f"must be in [0, 2**63 - 1], got {self.seed}")

    def nth(self, index: int) -> "Sampling":
        """The options of the index-th sample drawn with these: seeded with seed + index, so
        samples of one prompt differ and each is the same whatever is drawn beside it."""
        return self if self.seed is None else replace(self, seed=self.seed + index)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def candidates(self) -> int | None:
        """How many of the most likely tokens a draw can pick from: 1 greedy, k with top-k,
        None (the whole vocabulary) otherwise."""
        return 1 if self.greedy else self.top_k


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, V): argmax at temperature 0, else a draw from the
    temperature-scaled distribution cut to the top-k and the top-p nucleus."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= sampling.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class Sampler:
    """One sequence's sampling options and random generator (none for greedy): seeded from
    `sampling.seed`, or freshly when it is None."""

    def __init__(self, sampling: Sampling, device):
        self.sampling = sampling
        self.generator = None
        if not sampling.greedy:
            self.generator = torch.Generator(device=device)
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token (a one-element tensor) from one row's logits (1, V)."""
        return sample_next(logits, self.sampling, self.generator)
