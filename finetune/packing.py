"""Supervised examples as training rows: prompt labels masked, examples packed into the context.

An example is `prompt + completion + <|endoftext|>`; the model learns only the completion and
the end token (prompt labels are -100). Examples are packed one after the other into rows of
`block_size` positions rather than padded one per row: code examples are short next to a
1024-token context, and padding would spend most of each row on nothing. Each row carries
segment ids, with which the model keeps attention inside an example and restarts positions
(base/model.py), so a packed example computes exactly what it would alone.

`PackedBatches` hands out rows with the same global cursor as the pretraining loader: rank r
takes the r-th slice of each `world_size * micro_batch_size` rows, and the cursor resumes on any
number of processes.
"""

from __future__ import annotations

import torch

from codegpt.base.errors import UserError
from codegpt.base.generate import infill_ids
from codegpt.base.loss import IGNORE_INDEX
from codegpt.base.tokenizer import Tokenizer

PAD_SEGMENT = -1


def encode_example(tokenizer: Tokenizer, prompt: str, completion: str,
                   suffix: str | None = None) -> tuple[list[int], list[int]]:
    """(inputs, labels) of one example, already shifted: labels[i] is the token after inputs[i].
    With `suffix`, the prompt is fill-in-the-middle's (PSM) and the completion the middle."""
    prompt_ids = tokenizer.encode(prompt) if suffix is None else infill_ids(tokenizer, prompt, suffix, budget=None)
    completion_ids = tokenizer.encode(completion) + [tokenizer.eot_id]
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return ids[:-1], labels[1:]


def pack(examples: list[tuple[list[int], list[int]]], block_size: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy packing in the given order: an example goes into the current row if it fits, else
    it starts the next one. Returns rows of (inputs, labels, segments), padded to block_size."""
    rows, current = [], ([], [], [])
    for inputs, labels in examples:
        if len(current[0]) + len(inputs) > block_size:
            rows.append(current)
            current = ([], [], [])
        segment = len(set(current[2]))
        current[0].extend(inputs)
        current[1].extend(labels)
        current[2].extend([segment] * len(inputs))
    if current[0]:
        rows.append(current)
    for inputs, labels, segments in rows:
        pad = block_size - len(inputs)
        inputs.extend([0] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        segments.extend([PAD_SEGMENT] * pad)
    return rows


class PackedBatches:
    """Micro-batches of packed rows, reshuffled (and repacked) every epoch from the seed."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], block_size: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        too_long = sum(len(inputs) > block_size for inputs, _ in examples)
        self.examples = [e for e in examples if len(e[0]) <= block_size]
        self.dropped_too_long = too_long
        if not self.examples:
            raise UserError(f"no example fits in {block_size} tokens ({too_long} are longer)")
        self.block_size, self.batch, self.rank, self.world = block_size, micro_batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._rows_epoch, self._rows = -1, []

    def rows(self, epoch: int) -> list:
        if epoch != self._rows_epoch:
            order = list(range(len(self.examples)))
            if self.shuffle:
                order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()
            self._rows = pack([self.examples[i] for i in order], self.block_size)
            self._rows_epoch = epoch
        return self._rows

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows(self.epoch))

    def _take(self, count: int) -> list:
        taken = []
        while len(taken) < count:
            rows = self.rows(self.epoch)
            if self.position >= len(rows):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            taken.append(rows[self.position])
            self.position += 1
        return taken

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step_rows = self._take(self.world * self.batch)
        mine = step_rows[self.rank * self.batch : (self.rank + 1) * self.batch]
        return tuple(torch.tensor([row[i] for row in mine], dtype=torch.long) for i in range(3))

    def rewind(self) -> None:
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state["examples"] != len(self.examples):
            raise UserError(f"the checkpoint's data cursor is for {state['examples']} examples, this data has "
                            f"{len(self.examples)} (the data changed: start over with train.resume=false)")
        self.epoch, self.position = state["epoch"], state["position"]
