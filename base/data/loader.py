"""Training batches from token shards: windows of block_size + 1 tokens, shuffled per epoch.

Window w covers tokens [w * block_size, w * block_size + block_size + 1) of one shard (inputs
and targets shifted by one). Each epoch visits every window once, in an order drawn from the
seed and the epoch. A global cursor counts windows handed out to all processes: on every call
rank r takes the r-th slice of the next `world_size * micro_batch_size` windows. So one
optimizer step sees the same windows whatever the number of processes, and the cursor saved in
a checkpoint resumes on any number of processes. With `fim`, each window's documents are turned
into fill-in-the-middle examples as it is loaded (base/data/fim.py), drawn from the seed and the
window's global position: the same on any number of processes and after a resume.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from codegpt.base.errors import UserError
from codegpt.base.data.fim import Fim, fim_window, window_rng
from codegpt.base.data.shards import read_index


class BatchLoader:
    def __init__(self, shard_dir: str, split: str, block_size: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, fim: Fim | None = None):
        index = read_index(Path(shard_dir))
        if index is None:
            raise UserError(f"{shard_dir}: no token shards (build them with `codegpt data <recipe>`)")
        self.block_size, self.batch, self.rank, self.world = block_size, micro_batch_size, rank, world_size
        self.seed, self.shuffle, self.fim = seed, shuffle, fim
        self.shards, self.first_window = [], [0]
        for shard in index["splits"][split]["shards"]:
            tokens = np.memmap(Path(shard_dir) / shard["file"], dtype="<u4", mode="r")
            windows = max(0, (len(tokens) - 1) // block_size)
            if windows:
                self.shards.append(tokens)
                self.first_window.append(self.first_window[-1] + windows)
        self.num_windows = self.first_window[-1]
        if self.num_windows == 0:
            more = "add data, raise data.val_fraction" if split == "val" else "add data"
            raise UserError(f"{shard_dir}: the {split} split has no window of {block_size + 1} tokens; {more} "
                            "or lower model.block_size")
        self.cursor = 0  # windows handed out so far, over all epochs and ranks
        self._order_epoch, self._order = -1, None

    @property
    def rows_per_epoch(self) -> int:
        return self.num_windows

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.num_windows, generator=generator)
            else:
                self._order = torch.arange(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def _window(self, position: int) -> np.ndarray:
        epoch, offset = divmod(position, self.num_windows)
        window = int(self._epoch_order(epoch)[offset])
        shard = bisect.bisect_right(self.first_window, window) - 1
        start = (window - self.first_window[shard]) * self.block_size
        return self.shards[shard][start : start + self.block_size + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.cursor + self.rank * self.batch
        rows = np.stack([self._row(p) for p in range(first, first + self.batch)]).astype(np.int64)
        self.cursor += self.world * self.batch
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def _row(self, position: int) -> np.ndarray:
        window = self._window(position)
        if self.fim is None or self.fim.rate == 0:
            return window
        return fim_window(window, window_rng(self.seed, position), self.fim.rate, self.fim.spm_rate, self.fim.tokens)

    def rewind(self) -> None:
        self.cursor = 0

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed, "num_windows": self.num_windows, "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_windows"], state["block_size"]) != (self.num_windows, self.block_size):
            raise UserError(f"the checkpoint's data cursor is for {state['num_windows']} windows of "
                            f"{state['block_size']} tokens; these shards have {self.num_windows} of {self.block_size} "
                            "(the data changed since the run started: start over with train.resume=false or "
                            "another out_dir)")
        self.cursor = state["cursor"]
