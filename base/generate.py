"""Sampling text from a CodeGPT model with a KV cache.

`stream()` yields (row, text) pieces as they are decoded, for a batch of prompts at once;
`generate()` collects them. Options: temperature (0 = greedy), top-k, top-p, stop strings,
max new tokens, seed. Text is released only once it cannot be the start of a stop string, and
a character split across tokens is held back until complete, so the pieces of a row joined are
exactly its final completion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from codegpt.base.decode_head import next_token_head
from codegpt.base.errors import UserError
from codegpt.base.model import GPT, KVCache
from codegpt.base.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, Tokenizer

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


class _RowText:
    """The decoded text of one row, released only when no stop string can still begin in it."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder = tokenizer.stream_decoder()
        self.stop = stop
        self.pending = ""
        self.done = False

    def push(self, token_id: int) -> str:
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.done = self.pending[: min(hits)], "", True
            return out
        hold = 0 if final else max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
             if self.pending.endswith(s[:k])),
            default=0,
        )
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        self.done = self.done or final
        return out


def banned_ids(model: GPT, tokenizer: Tokenizer, device) -> torch.Tensor:
    """Ids never to sample: those the tokenizer cannot decode (the padding rows and gaps), the
    fill-in-the-middle sentinels (prompt structure, never code), and those outside the model's
    softmax (a model trained over the ids its data holds)."""
    banned = torch.ones(model.config.vocab_size, dtype=torch.bool, device=device)
    valid = torch.tensor(tokenizer.valid_ids, device=device)
    banned[valid[valid < model.config.vocab_size]] = False
    sentinels = [tokenizer.special_ids[token] for token in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)]
    banned[[i for i in sentinels if i < model.config.vocab_size]] = True
    inactive = model.inactive()
    return banned if inactive is None else banned | inactive.to(device)


def decoder(model: GPT, cache: KVCache, head, graphs: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function from one new token per row (B, 1) to next-token logits (B, V), continuing
    `cache`. On a GPU the step is a CUDA graph replayed per token (`GraphedDecodeStep`) unless
    `graphs` is False; elsewhere it runs eagerly over the cache's filled slots."""
    if graphs and cache.key_valid.device.type == "cuda":
        return GraphedDecodeStep(model, cache, head)
    return lambda ids: head(model.cached_hidden_states(ids, cache)[:, -1])


class GraphedDecodeStep:
    """One decoding step captured once as a CUDA graph and replayed for every token.

    A step of the 70M model is some hundred small kernels; launched one by one from Python they
    take ~2.5 ms per token on an H100-class GPU, while the work itself (reading the weights once)
    takes tens of microseconds. `GPT.decode_step` has fixed shapes and keeps the cache slot in a
    tensor, so the whole step, head included, is one graph launch."""

    def __init__(self, model: GPT, cache: KVCache, head):
        device = cache.key_valid.device
        self.cache = cache
        self.ids = torch.zeros(cache.key_valid.shape[0], 1, dtype=torch.long, device=device)
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=device)

        def step():
            return head(model.decode_step(self.ids, self.slot, cache)[:, -1])

        # Warm up outside the capture (cuBLAS handles, lazy initialisation). It writes the slot the
        # first replay writes again.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions; {self.cache.length + 1} requested")
        self.ids.copy_(ids)
        self.slot.fill_(self.cache.length)
        self.graph.replay()
        self.cache.length += 1
        return self.logits


@torch.no_grad()
def token_steps(model: GPT, prompts: list[list[int]], sampling: Sampling, banned: torch.Tensor,
                 start_id: int, graphs: bool = True) -> Iterator[list[int]]:
    """Yield the next token of every row, forever (the caller stops). Prompts are left-padded to
    one length; when the context fills, the cache is rebuilt from the last 3/4 of it. `banned`
    (a bool mask over the vocabulary) is never sampled; an empty prompt starts from `start_id`.
    `graphs=False` decodes without CUDA graphs (to compare against)."""
    device = banned.device
    block = model.config.block_size
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    prompts = [p[-(block - 1):] if p else [] for p in prompts]
    width = max(1, max(len(p) for p in prompts))
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for row, ids in enumerate(prompts):
        if ids:
            tokens[row, width - len(ids):] = torch.tensor(ids, device=device)
            valid[row, width - len(ids):] = True
        else:  # an empty prompt starts from <|endoftext|>, as a document would
            tokens[row, -1] = start_id
            valid[row, -1] = True
    head = next_token_head(model, 1 if sampling.temperature == 0 else sampling.top_k, banned)

    def prefill(tokens, valid):
        cache = model.new_cache(len(prompts))
        return cache, head(model.cached_hidden_states(tokens, cache, valid)[:, -1]), decoder(model, cache, head, graphs)

    cache, logits, step = prefill(tokens, valid)
    while True:
        next_ids = sample_next(logits, sampling, generator)
        yield next_ids.tolist()
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        valid = torch.cat([valid, valid.new_ones(len(prompts), 1)], dim=1)
        if cache.length == cache.max_len:
            keep = block * 3 // 4
            tokens, valid = tokens[:, -keep:], valid[:, -keep:]
            cache, logits, step = prefill(tokens, valid)
        else:
            logits = step(next_ids[:, None])


def infill_ids(tokenizer: Tokenizer, prefix: str, suffix: str, budget: int | None) -> list[int]:
    """The PSM prompt of a hole between `prefix` and `suffix`: <|fim_prefix|> prefix
    <|fim_suffix|> suffix <|fim_middle|>, the model then writes the middle. At most `budget`
    tokens (None: no bound): the code nearest the hole is kept, the prefix's end and the
    suffix's start (the suffix given at most half)."""
    ids = tokenizer.special_ids
    before, after = tokenizer.encode(prefix), tokenizer.encode(suffix)
    if budget is None:
        return [ids[FIM_PREFIX], *before, ids[FIM_SUFFIX], *after, ids[FIM_MIDDLE]]
    room = max(0, budget - 3)
    after = after[: max(room // 2, room - len(before))]
    before = before[len(before) - (room - len(after)):] if len(before) > room - len(after) else before
    return [ids[FIM_PREFIX], *before, ids[FIM_SUFFIX], *after, ids[FIM_MIDDLE]]


def not_trained_for_infilling(model: GPT) -> str | None:
    """The warning that goes with a suffix given to a model not trained with fill-in-the-middle."""
    if model.config.fim:
        return None
    return ("this model was not trained for fill-in-the-middle (its config says fim: false): "
            "expect the middle to continue the suffix or to ignore it")


def stream(model: GPT, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling,
           suffixes: list[str | None] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (row, text) pieces of each prompt's completion as they are decoded. A row ends at
    <|endoftext|>, a stop string (not included) or max_new_tokens. A row with a suffix is a hole
    to fill: its prompt is the code before it, and the text yielded the middle."""
    sampling.validate()
    suffixes = suffixes or [None] * len(prompts)
    # Leave the cache room for the middle: a full cache would drop the start of the PSM prompt.
    budget = model.config.block_size - min(sampling.max_new_tokens, model.config.block_size // 2)
    encoded = [tokenizer.encode(p) if s is None else infill_ids(tokenizer, p, s, budget)
               for p, s in zip(prompts, suffixes)]
    was_training = model.training
    model.eval()
    try:
        device = model.transformer.wte.weight.device
        rows = [_RowText(tokenizer, sampling.stop) for _ in prompts]
        steps = token_steps(model, encoded, sampling, banned_ids(model, tokenizer, device), tokenizer.eot_id)
        for _, next_ids in zip(range(sampling.max_new_tokens), steps):
            for row, token_id in enumerate(next_ids):
                if rows[row].done:
                    continue
                piece = rows[row].finish() if token_id == tokenizer.eot_id else rows[row].push(token_id)
                if piece:
                    yield row, piece
            if all(r.done for r in rows):
                break
        steps.close()
        for row, text in enumerate(rows):
            if not text.done and (piece := text.finish()):
                yield row, piece
    finally:
        model.train(was_training)


def generate(model: GPT, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling,
             suffixes: list[str | None] | None = None) -> list[str]:
    """The completion of each prompt (without the prompt); with suffixes, the middle of each hole."""
    completions = [""] * len(prompts)
    for row, piece in stream(model, tokenizer, prompts, sampling, suffixes):
        completions[row] += piece
    return completions
