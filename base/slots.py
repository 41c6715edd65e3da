"""Decoding many sequences at once, in the rows of one KV cache, each row with its own length.

A `SlotEngine` holds the keys and values of `rows` sequences of up to the model's context each. A
sequence takes a free row (`add`; `add_many` prefills several prompts in one forward, right-padded
to the longest), and from the next `step` on it advances one token per step together with every
other row in use, each with its own sampling options and random generator. `release` frees the row
for the next sequence. A row whose context is full is refilled from its last 3/4 (positions restart
at 0) before it advances.

The step over the rows has fixed shapes: each row writes its new key and value at the position its
length (a tensor) gives, and attends under a mask made from the lengths. On a GPU the step is
captured once as a CUDA graph when the engine is made and replayed for every token; elsewhere, or
where capture fails (one warning line), the same step runs eagerly over the rows up to the last one
in use and the positions written so far. On a CPU where it is measured faster, the blocks' weights
are prepacked for MKL at the engine's row count (base/packed_linear.py), and a step with at least
3/4 of the rows in use runs them all. `shared_engine` keeps one engine per model and batch size
between calls, so that `generate` captures once per shape, not once per call.
"""

from __future__ import annotations

import contextlib
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from codegpt.base.decode_head import RankedHead, next_token_head
from codegpt.base.model import GPT
from codegpt.base.packed_linear import packed_linears
from codegpt.base.sampling import Sampler, Sampling


class RowAdapters:
    """Which adapter each row of the batch being run uses (0: the base alone), read by layers that
    apply one adapter per row (finetune/multi_lora.py; base/ knows no LoRA). The engine points
    `current` at its own rows' entries before each forward, so a captured graph reads them in place."""

    def __init__(self):
        self.current: torch.Tensor | None = None


@dataclass(eq=False)
class Slot:
    """A sequence decoding in one row of an engine."""

    row: int
    sampler: Sampler
    tokens: list[int]  # what the row holds, then the token it feeds to the next step
    length: int = 0  # positions of the row written so far
    generated: int = 0
    min_new_tokens: int = 0  # <|endoftext|> is not drawn before this many tokens


class _PrefillWrite:
    """A layer's cache while rows are prefilled: stores each prompt's keys and values from its
    row's start; attention reads this forward's alone (causal)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
        self.keys, self.values, self.rows = keys, values, rows

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = k.shape[2]
        self.keys[self.rows, :, :end] = k
        self.values[self.rows, :, :end] = v
        return k, v


class _StepWrite:
    """A layer's cache during one decoding step of rows [0, n): each row's new key and value go to
    its own position (`index`, n x n_head x 1 x head_dim); attention reads the first `width`
    positions of every row, under the step's mask."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, width: int):
        n = index.shape[0]
        self.keys, self.values, self.index, self.width = keys[:n], values[:n], index, width

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.scatter_(2, self.index, k)
        self.values.scatter_(2, self.index, v)
        return self.keys[:, :, : self.width], self.values[:, :, : self.width]


def graphs_available(device: torch.device) -> bool:
    return device.type == "cuda"


def capture_graph(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture `step` (no arguments, fixed shapes, no host synchronisation) as a CUDA graph.
    Returns (replay, output): each replay recomputes `output` in place from the tensors the step
    reads."""
    # Warm up outside the capture (cuBLAS handles, lazy initialisation).
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph.replay, output


class SlotEngine:
    """`rows` rows of one KV cache for `model`, and the decoding step over them.

    `banned` (bool over the vocabulary) is never sampled; `eot_id` starts an empty prompt and is
    held back from a sequence until its `min_new_tokens`. With `row_adapters`, each sequence runs
    with the adapter `add` names. `capture_seconds` is how long capturing the step took (None:
    no graph; it decodes eagerly)."""

    def __init__(self, model: GPT, rows: int, banned: torch.Tensor, eot_id: int, graphs: bool = True,
                 row_adapters: RowAdapters | None = None, packed: bool | None = None):
        config = model.config
        weight = model.transformer.wte.weight
        self.model, self.rows, self.banned, self.eot_id = model, rows, banned, eot_id
        self.device, self.max_len, self.vocab_size = weight.device, config.block_size, config.vocab_size
        self.head_shape = (config.n_head, config.n_embd // config.n_head)
        shape = (rows, config.n_head, self.max_len, config.n_embd // config.n_head)
        self.keys = [torch.zeros(shape, device=self.device, dtype=weight.dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=self.device, dtype=weight.dtype) for _ in range(config.n_layer)]
        # What the step reads, in place: positions written per row, 1 where a row's length grows,
        # each row's next token and adapter.
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.advance = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.next_ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.adapter_of_row = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.positions = torch.arange(self.max_len, device=self.device)
        self.row_adapters = row_adapters
        self.slots: list[Slot | None] = [None] * rows
        self.heads: dict[int | None, Callable] = {}
        self.heads_version = model.lm_head.weight._version
        self.replay: Callable[[], None] | None = None  # the captured step, and where it writes
        self.graph_output: torch.Tensor | None = None
        self.capture_seconds: float | None = None
        # The blocks' weights prepacked for a step over every row (base/packed_linear.py): by
        # default only where measured faster here; True: wherever MKL can (tests); False: never.
        self.packed = None if packed is False else packed_linears(model, rows, measure=packed is None)
        if graphs and graphs_available(self.device):
            self._capture()

    @property
    def free_rows(self) -> int:
        return self.slots.count(None)

    @property
    def busy(self) -> bool:
        return self.free_rows < self.rows

    def set_banned(self, banned: torch.Tensor) -> None:
        if banned is not self.banned and not torch.equal(banned, self.banned):
            self.banned, self.heads = banned, {}

    def add(self, prompt: list[int], sampling: Sampling, adapter: int = 0, min_new_tokens: int = 0) -> Slot:
        """Prefill a free row with `prompt` (its last max_len - 1 tokens; empty: <|endoftext|>);
        the sequence's first token comes from the next `step`."""
        return self.add_many([(prompt, sampling, adapter, min_new_tokens)])[0]

    @torch.no_grad()
    def add_many(self, sequences: list[tuple[list[int], Sampling, int, int]]) -> list[Slot]:
        """`add` for several (prompt, sampling, adapter, min_new_tokens) at once: their prompts are
        prefilled together, in one forward (a matrix product over all their tokens costs less
        than one per prompt)."""
        if len(sequences) > self.free_rows:
            raise RuntimeError(f"all {self.rows} rows are in use" if not self.free_rows else
                               f"{len(sequences)} sequences, but only {self.free_rows} of {self.rows} rows are free")
        prompts = [self.prompt_tokens(prompt) for prompt, *_ in sequences]
        free = [row for row, slot in enumerate(self.slots) if slot is None]
        added = []
        for row, tokens, (_, sampling, adapter, min_new_tokens) in zip(free, prompts, sequences):
            added.append(Slot(row, Sampler(sampling, self.device), tokens, min_new_tokens=min_new_tokens))
            self.adapter_of_row[row] = adapter
        self._fill(added)
        for slot in added:
            self.advance[slot.row] = 1
            self.slots[slot.row] = slot
        return added

    def prompt_tokens(self, prompt: list[int]) -> list[int]:
        """What a row holds of `prompt`: its last max_len - 1 tokens, or <|endoftext|> for an
        empty one. ValueError for an id outside the model's embeddings."""
        tokens = list(prompt[-(self.max_len - 1):]) or [self.eot_id]
        if outside := [t for t in tokens if not 0 <= t < self.vocab_size]:
            raise ValueError(f"token id {outside[0]} is outside the model's {self.vocab_size} embeddings")
        return tokens

    def release(self, slot: Slot) -> None:
        if self.slots[slot.row] is slot:
            self.slots[slot.row] = None
            self.advance[slot.row] = 0
            self.lengths[slot.row] = 0
            self.adapter_of_row[slot.row] = 0

    @torch.no_grad()
    def step(self) -> list[tuple[Slot, int]]:
        """Advance every sequence by one token; returns (slot, its new token) for each."""
        busy = [slot for slot in self.slots if slot is not None]
        if not busy:
            return []
        for slot in busy:
            if slot.length == self.max_len:
                self._refill(slot)
        n = busy[-1].row + 1
        self.next_ids[:n, 0] = torch.tensor([0 if s is None else s.tokens[-1] for s in self.slots[:n]])
        if self.replay is not None:
            self.replay()
            hidden = self.graph_output[:n]
        else:
            # Weights packed for every row are faster than the usual path at n rows: run them all.
            rows = self.rows if self.packed is not None and self.packed.serves(n) else n
            hidden = self._decode(rows, max(slot.length for slot in busy) + 1)[:n]
        self._select_adapters(slice(0, n))
        chosen = self._choose(self._head(busy), hidden, busy)
        for slot, token in zip(busy, chosen):
            slot.length += 1
            slot.generated += 1
            slot.tokens.append(token)
        return list(zip(busy, chosen))

    def _decode(self, n: int, width: int) -> torch.Tensor:
        """Final hidden states (n, n_embd) of one step of rows [0, n), attending over the first
        `width` positions of each. No host synchronisation and no shape that depends on the
        lengths: with n = rows and width = max_len it is the step a CUDA graph captures."""
        position = self.lengths[:n, None]
        n_head, head_dim = self.head_shape
        index = position.view(n, 1, 1, 1).expand(n, n_head, 1, head_dim)
        mask = (self.positions[:width] <= position)[:, None, None, :]
        writes = [_StepWrite(k, v, index, width) for k, v in zip(self.keys, self.values)]
        self._select_adapters(slice(0, n))
        packed = self.packed if self.packed is not None and n == self.rows else None
        if packed is not None:
            packed.refresh()
        with packed if packed is not None else contextlib.nullcontext():
            hidden = self.model.cached_hidden_states(self.next_ids[:n], position, mask, writes)[:, -1]
        self.lengths[:n] += self.advance[:n]
        return hidden

    def _fill(self, slots: list[Slot]) -> None:
        """Write the keys and values of each slot's tokens but the last (which its first step
        feeds) from the start of its row. The prompts are right-padded to the longest: a row's
        positions past its length are masked in every step until the step that writes them."""
        lengths = [len(slot.tokens) - 1 for slot in slots]
        filled = [(slot, length) for slot, length in zip(slots, lengths) if length]
        if filled:
            width = max(lengths)
            ids = torch.tensor([slot.tokens[:-1] + [0] * (width - length) for slot, length in filled],
                               device=self.device)
            rows = torch.tensor([slot.row for slot, _ in filled], device=self.device)
            self._select_adapters(rows)
            writes = [_PrefillWrite(k, v, rows) for k, v in zip(self.keys, self.values)]
            self.model.cached_hidden_states(ids, torch.arange(width, device=self.device), None, writes)
        for slot, length in zip(slots, lengths):
            slot.length = length
            self.lengths[slot.row] = length

    def _refill(self, slot: Slot) -> None:
        """A full row starts again from its last 3/4, the token it feeds next included."""
        slot.tokens = slot.tokens[-(self.max_len * 3 // 4):]
        self._fill([slot])

    def _select_adapters(self, rows: slice | torch.Tensor) -> None:
        if self.row_adapters is not None:
            self.row_adapters.current = self.adapter_of_row[rows]

    def _head(self, busy: list[Slot]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The head for this step: ranked to the most candidates any sequence draws from, or
        exact when one draws from the whole vocabulary."""
        wanted = [slot.sampler.sampling.candidates for slot in busy]
        top = None if None in wanted else max(wanted)
        # A ranked head holds a ranking copy of the weight: weights trained or edited in place
        # since (their version counter moved) need a new one.
        version = self.model.lm_head.weight._version
        if version != self.heads_version:
            self.heads, self.heads_version = {}, version
        if top not in self.heads:
            self.heads[top] = next_token_head(self.model, top, self.banned)
        return self.heads[top]

    def _choose(self, head: Callable, hidden: torch.Tensor, busy: list[Slot]) -> list[int]:
        """Each sequence's next token."""
        held_back = [slot.row for slot in busy if slot.generated < slot.min_new_tokens]  # no <|endoftext|> yet
        if isinstance(head, RankedHead) and all(slot.sampler.sampling.greedy for slot in busy):
            # Greedy only: the best of each row's candidates, without the whole vocabulary's logits.
            candidates, exact = head.top(hidden)
            if held_back:
                exact[held_back] = exact[held_back].masked_fill(candidates[held_back] == self.eot_id, float("-inf"))
            values = candidates.gather(1, exact.argmax(dim=-1, keepdim=True))[:, 0].tolist()
            return [values[slot.row] for slot in busy]
        logits = head(hidden)
        if held_back:
            logits[held_back, self.eot_id] = float("-inf")
        picks = logits.argmax(dim=-1)
        for slot in busy:
            if not slot.sampler.sampling.greedy:
                picks[slot.row] = slot.sampler(logits[slot.row: slot.row + 1])[0]
        values = picks.tolist()
        return [values[slot.row] for slot in busy]

    @torch.no_grad()
    def _capture(self) -> None:
        started = time.perf_counter()
        try:
            self.replay, self.graph_output = capture_graph(lambda: self._decode(self.rows, self.max_len), self.device)
        except Exception as err:  # whatever failed, eager decoding computes the same tokens
            print(f"warning: capturing the decoding step as a CUDA graph failed ({type(err).__name__}: {err}); "
                  "decoding eagerly", file=sys.stderr, flush=True)
            self.replay = None
            return
        self.capture_seconds = time.perf_counter() - started


# model -> {rows: (the weights it was made for, engine)}; weak, so a model's engines go with it.
_SHARED: "weakref.WeakKeyDictionary[GPT, dict[tuple[int, bool], tuple[tuple, SlotEngine]]]" = weakref.WeakKeyDictionary()


def _weights_key(model: GPT) -> tuple:
    """Where the weights live: a captured graph reads them there, so moving them (another dtype
    or device) needs a new engine."""
    return tuple((t.data_ptr(), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def shared_engine(model: GPT, rows: int, banned: torch.Tensor, eot_id: int, graphs: bool = True) -> SlotEngine:
    """An idle engine of `rows` rows for `model`, kept from earlier calls where its weights have
    not moved; a busy one (a caller still decoding) is left to its caller and a new one made."""
    engines = _SHARED.setdefault(model, {})
    weights = _weights_key(model)
    kept = engines.get((rows, graphs))
    if kept is not None and kept[0] == weights and not kept[1].busy:
        kept[1].set_banned(banned)
        return kept[1]
    # The engine holds the model weakly: the registry must not keep the model alive.
    engine = SlotEngine(weakref.proxy(model), rows, banned, eot_id, graphs)
    if kept is None or kept[0] != weights:
        engines[(rows, graphs)] = (weights, engine)
    return engine
