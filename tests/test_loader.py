"""The batch loader: windows and shifted targets, ranks that see disjoint windows covering the data,
one process equal to two over an optimizer step, a cursor that resumes across world sizes and
epochs, and a fixed validation sample."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from codegpt.base.errors import UserError
from codegpt.base.data.fim import Fim, FimTokens
from codegpt.base.data.loader import BatchLoader
from codegpt.base.tokenizer import Tokenizer

SIZES = [1000, 337, 2000, 16]  # the last shard is too short for a window of 17 tokens


def synthetic_shards(shard_dir: Path, sizes: list[int] = SIZES) -> Path:
    """Shards of consecutive integers, so each window is known by its first token."""
    shard_dir.mkdir()
    shards, start = [], 0
    for i, size in enumerate(sizes):
        np.arange(start, start + size, dtype="<u4").tofile(shard_dir / f"s{i}.train.bin")
        shards.append({"file": f"s{i}.train.bin", "tokens": size})
        start += size
    (shard_dir / "index.json").write_text(json.dumps({"splits": {"train": {"shards": shards}, "val": {"shards": []}}}))
    return shard_dir


@pytest.fixture
def shard_dir(tmp_path):
    return str(synthetic_shards(tmp_path / "shards"))


def first_tokens(loader: BatchLoader, calls: int) -> list[int]:
    return [int(row[0]) for _ in range(calls) for row in loader.next_batch()[0]]


def test_windows_are_block_plus_one_tokens_with_shifted_targets(shard_dir):
    loader = BatchLoader(shard_dir, "train", 16, 4, shuffle=False)
    assert loader.num_windows == 999 // 16 + 336 // 16 + 1999 // 16
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16) and x.device.type == "cpu"
    assert torch.equal(x[:, 0], torch.tensor([0, 16, 32, 48])) and torch.equal(y, x + 1)
    # Windows never straddle two shards: each starts a whole number of blocks into its shard.
    starts = {0, 1000, 1337}
    firsts = first_tokens(BatchLoader(shard_dir, "train", 16, 1, shuffle=False), loader.num_windows)
    assert all(any((f - s) % 16 == 0 and s <= f < s + size - 16 for s, size in zip(sorted(starts), SIZES))
               for f in firsts)
    assert len(set(firsts)) == loader.num_windows


def test_ranks_see_disjoint_windows_that_cover_the_data(shard_dir):
    block, batch = 16, 4
    num_windows = BatchLoader(shard_dir, "train", block, batch).num_windows
    steps = num_windows // (2 * batch)
    ranks = [first_tokens(BatchLoader(shard_dir, "train", block, batch, rank=r, world_size=2, seed=3), steps)
             for r in (0, 1)]
    one_process = first_tokens(BatchLoader(shard_dir, "train", block, batch, seed=3), 2 * steps)
    assert not set(ranks[0]) & set(ranks[1])
    every_window = set(first_tokens(BatchLoader(shard_dir, "train", block, 1, shuffle=False), num_windows))
    seen = set(ranks[0] + ranks[1])
    assert len(seen) == 2 * steps * batch and seen <= every_window
    assert len(every_window - seen) == num_windows % (2 * batch)  # an epoch, bar the remainder of a step
    # Micro-batch by micro-batch, two ranks see exactly the windows one process sees in two micro-batches.
    for step in range(steps):
        two = ranks[0][step * batch:(step + 1) * batch] + ranks[1][step * batch:(step + 1) * batch]
        assert two == one_process[2 * step * batch:2 * (step + 1) * batch]
    assert first_tokens(BatchLoader(shard_dir, "train", block, batch, seed=3), 2 * steps) == one_process
    other_seed = first_tokens(BatchLoader(shard_dir, "train", block, batch, seed=4), 2 * steps)
    assert other_seed != one_process and sorted(other_seed) != other_seed


def test_every_epoch_is_a_new_permutation_of_all_windows(shard_dir):
    loader = BatchLoader(shard_dir, "train", 16, 5, seed=7)
    n = loader.num_windows
    stream = first_tokens(loader, 3 * n // 5 + 1)  # batches cross the epoch boundaries
    epochs = [stream[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == n for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_the_cursor_resumes_on_any_number_of_processes(shard_dir):
    batch = 3
    reference = first_tokens(BatchLoader(shard_dir, "train", 16, batch, seed=1), 60)  # 30 steps of 2 micro-batches
    # Two ranks for 7 steps, then the saved cursor continues on one process: the same windows.
    ranks = [BatchLoader(shard_dir, "train", 16, batch, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for _ in range(7):
        for loader in ranks:
            loader.next_batch()
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state == ranks[1].state_dict() and state["cursor"] == 7 * 2 * batch
    single = BatchLoader(shard_dir, "train", 16, batch, seed=1)
    single.load_state_dict(state)
    assert first_tokens(single, 2 * 8) == reference[7 * 2 * batch:15 * 2 * batch]
    # And back: one process for 15 steps, then two ranks.
    state = single.state_dict()
    resumed = [BatchLoader(shard_dir, "train", 16, batch, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for loader in resumed:
        loader.load_state_dict(state)
    windows = [w for _ in range(15) for loader in resumed for w in first_tokens(loader, 1)]
    assert windows == reference[15 * 2 * batch:]


def test_a_changed_dataset_refuses_the_cursor(shard_dir, tmp_path):
    state = BatchLoader(shard_dir, "train", 16, 2).state_dict()
    with pytest.raises(UserError, match="windows"):
        BatchLoader(shard_dir, "train", 32, 2).load_state_dict(state)
    other = synthetic_shards(tmp_path / "other", [500])
    with pytest.raises(UserError, match="the data changed"):
        BatchLoader(str(other), "train", 16, 2).load_state_dict(state)


def test_validation_is_a_fixed_sample_in_order(shard_dir):
    first = BatchLoader(shard_dir, "train", 16, 4, rank=1, world_size=2, seed=5, shuffle=False)
    batches = [first.next_batch()[0] for _ in range(3)]
    assert [int(b[0, 0]) for b in batches] == [64, 192, 320]  # rank 1 takes windows 4-7, 12-15, ...
    again = BatchLoader(shard_dir, "train", 16, 4, rank=1, world_size=2, seed=99, shuffle=False)
    assert all(torch.equal(b, again.next_batch()[0]) for b in batches)
    first.rewind()
    assert torch.equal(first.next_batch()[0], batches[0])


def test_missing_or_too_small_shards_are_user_errors(tmp_path, shard_dir):
    with pytest.raises(UserError, match=r"no token shards \(build them with `codegpt data"):
        BatchLoader(str(tmp_path / "none"), "train", 16, 2)
    with pytest.raises(UserError, match="the val split has no window of 17 tokens"):
        BatchLoader(shard_dir, "val", 16, 2)
    with pytest.raises(UserError, match="no window of 2001 tokens"):
        BatchLoader(shard_dir, "train", 2000, 2)


def test_fim_windows_are_the_same_on_two_ranks_and_after_a_resume(tmp_path):
    tokens = FimTokens.of(Tokenizer())
    stream = np.arange(3000, dtype="<u4")
    stream[::23] = tokens.eot  # documents of 22 tokens
    shard_dir = tmp_path / "fim"
    shard_dir.mkdir()
    stream.tofile(shard_dir / "s0.train.bin")
    (shard_dir / "index.json").write_text(json.dumps(
        {"splits": {"train": {"shards": [{"file": "s0.train.bin", "tokens": len(stream)}]}, "val": {"shards": []}}}))
    fim = Fim(rate=0.5, spm_rate=0.5, tokens=tokens)

    def rows(loader, calls):
        return [row.tolist() for _ in range(calls) for row in loader.next_batch()[0]]

    single = BatchLoader(str(shard_dir), "train", 32, 4, seed=3, fim=fim)
    reference = rows(single, 6)
    assert any(tokens.prefix in row for row in reference) and any(tokens.prefix not in row for row in reference)
    ranks = [BatchLoader(str(shard_dir), "train", 32, 2, rank=r, world_size=2, seed=3, fim=fim) for r in (0, 1)]
    assert [row for _ in range(6) for loader in ranks for row in rows(loader, 1)] == reference
    resumed = BatchLoader(str(shard_dir), "train", 32, 4, seed=3, fim=fim)
    plain = BatchLoader(str(shard_dir), "train", 32, 4, seed=3)
    for loader in (resumed, plain):
        loader.load_state_dict(BatchLoader(str(shard_dir), "train", 32, 4, seed=3).state_dict() | {"cursor": 12})
    assert rows(resumed, 3) == reference[12:]
    assert rows(plain, 3) != reference[12:]  # the same windows, left to right
