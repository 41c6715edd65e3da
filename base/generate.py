"""Sampling text from a CodeGPT model.

`stream()` yields (row, text) pieces as they are decoded, for a batch of prompts at once;
`generate()` collects them. Each prompt decodes in its own row of a `SlotEngine`
(base/slots.py), the one `codegpt serve` batches its requests in; row i of a seeded batch draws
with seed + i, so it gives what the prompt alone gives. Options (`Sampling`, base/sampling.py):
temperature (0 = greedy), top-k, top-p, stop strings, max new tokens, seed. Text is released only
once it cannot be the start of a stop string, and a character split across tokens is held back
until complete, so the pieces of a row joined are exactly its final completion (`Completion`).
"""

from __future__ import annotations

from typing import Iterator

import torch

from codegpt.base.model import GPT
from codegpt.base.sampling import Sampling
from codegpt.base.slots import shared_engine
from codegpt.base.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, Tokenizer


class _RowText:
    """The decoded text of one row, released only when no stop string can still begin in it."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder = tokenizer.stream_decoder()
        self.stop = stop
        self.pending = ""
        self.done = False
        self.stopped = False  # a stop string ended it

    def push(self, token_id: int) -> str:
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.done, self.stopped = self.pending[: min(hits)], "", True, True
            return out
        hold = 0 if final else max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
             if self.pending.endswith(s[:k])),
            default=0,
        )
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        self.done = self.done or final
        return out


class Completion:
    """One sequence's text as its tokens arrive. It ends at <|endoftext|> or a stop string (left
    out), `finish_reason` "stop", or after max_new_tokens tokens, "length". `push` returns the
    text that can be shown now."""

    def __init__(self, tokenizer: Tokenizer, sampling: Sampling):
        self.text = _RowText(tokenizer, sampling.stop)
        self.eot_id, self.max_new_tokens = tokenizer.eot_id, sampling.max_new_tokens
        self.tokens = 0
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> str:
        self.tokens += 1
        if token_id == self.eot_id:
            self.finish_reason = "stop"
            return self.text.finish()
        piece = self.text.push(token_id)
        if not self.text.done and self.tokens >= self.max_new_tokens:
            piece += self.text.finish()
        if self.text.done:
            self.finish_reason = "stop" if self.text.stopped else "length"
        return piece

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


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


def token_steps(model: GPT, prompts: list[list[int]], sampling: Sampling, banned: torch.Tensor,
                start_id: int, graphs: bool = True) -> Iterator[list[int]]:
    """Yield the next token of every row, forever (the caller stops): the rows of an engine kept
    for this model and batch size (`shared_engine`), row i drawing with `sampling.nth(i)`.
    `banned` (a bool mask over the vocabulary) is never sampled; an empty prompt starts from
    `start_id`. `graphs=False` decodes without CUDA graphs (to compare against)."""
    engine = shared_engine(model, len(prompts), banned, start_id, graphs)
    slots = []
    try:
        slots = engine.add_many([(ids, sampling.nth(row), 0, 0) for row, ids in enumerate(prompts)])
        while True:
            tokens = dict(engine.step())
            yield [tokens[slot] for slot in slots]
    finally:
        for slot in slots:
            engine.release(slot)


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


def prompt_ids(tokenizer: Tokenizer, block_size: int, prompt: str, suffix: str | None, max_new_tokens: int) -> list[int]:
    """The ids a completion continues: the prompt's, or with a suffix the PSM prompt of the hole
    between them, cut to leave the middle room in the context (a full cache would drop the
    start of the PSM prompt)."""
    if suffix is None:
        return tokenizer.encode(prompt)
    return infill_ids(tokenizer, prompt, suffix, block_size - min(max_new_tokens, block_size // 2))


def stream(model: GPT, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling,
           suffixes: list[str | None] | None = None) -> Iterator[tuple[int, str]]:
    """Yield (row, text) pieces of each prompt's completion as they are decoded. A row ends at
    <|endoftext|>, a stop string (not included) or max_new_tokens, and leaves the batch. A row
    with a suffix is a hole to fill: its prompt is the code before it, and the text yielded the
    middle."""
    sampling.validate()
    suffixes = suffixes or [None] * len(prompts)
    encoded = [prompt_ids(tokenizer, model.config.block_size, p, s, sampling.max_new_tokens)
               for p, s in zip(prompts, suffixes)]
    was_training = model.training
    model.eval()
    device = model.transformer.wte.weight.device
    engine = shared_engine(model, len(prompts), banned_ids(model, tokenizer, device), tokenizer.eot_id)
    running = {}
    try:
        for row, ids in enumerate(encoded):
            running[engine.add(ids, sampling.nth(row))] = (row, Completion(tokenizer, sampling))
        while running:
            for slot, token in engine.step():
                row, completion = running[slot]
                if piece := completion.push(token):
                    yield row, piece
                if completion.done:
                    engine.release(slot)
                    del running[slot]
    finally:
        for slot in running:
            engine.release(slot)
        model.train(was_training)


def generate(model: GPT, tokenizer: Tokenizer, prompts: list[str], sampling: Sampling,
             suffixes: list[str | None] | None = None) -> list[str]:
    """The completion of each prompt (without the prompt); with suffixes, the middle of each hole."""
    completions = [""] * len(prompts)
    for row, piece in stream(model, tokenizer, prompts, sampling, suffixes):
        completions[row] += piece
    return completions
