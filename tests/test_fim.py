"""The fill-in-the-middle transform: pieces that give back each document, rates that hold, both
orders, windows that keep their length, draws fixed by the seed and the position."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from codegpt.base.data.fim import FimTokens, fim_window, rearrange, window_rng
from codegpt.base.errors import UserError
from codegpt.base.recipe import DataConfig, PretrainRecipe
from codegpt.base.recipe_loader import load_recipe
from codegpt.base.data.shards import build_hash
from codegpt.base.tokenizer import Tokenizer

TOKENS = FimTokens.of(Tokenizer())
ROOT = Path(__file__).resolve().parent.parent


def restore(rearranged: np.ndarray) -> list[int]:
    """The document put back together from its pieces: prefix + middle + suffix."""
    ids = rearranged.tolist()
    assert ids[0] == TOKENS.prefix
    suf, mid = ids.index(TOKENS.suffix), ids.index(TOKENS.middle)
    if suf == 1:  # SPM: <PRE><SUF> suffix <MID> prefix middle (also PSM with an empty prefix)
        return ids[mid + 1 :] + ids[2:mid]
    return ids[1:suf] + ids[mid + 1 :] + ids[suf + 1 : mid]


@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_the_pieces_in_order_give_back_the_document(spm_rate):
    rng = np.random.default_rng(0)
    for _ in range(200):
        document = rng.integers(0, 1000, size=rng.integers(0, 40)).astype(np.uint32)
        rearranged = rearrange(document, rng, spm_rate, TOKENS)
        assert restore(rearranged) == document.tolist()
        if spm_rate:
            assert rearranged[1] == TOKENS.suffix


def documents_of(window: np.ndarray) -> list[list[int]]:
    out, current = [], []
    for token in window.tolist():
        if token == TOKENS.eot:
            out.append(current)
            current = []
        else:
            current.append(token)
    return out


def test_rates_hold_within_statistical_bounds_and_both_orders_appear():
    rng = np.random.default_rng(1)
    rate, spm_rate, trials = 0.5, 0.5, 0
    fim = spm = 0
    for position in range(400):
        # Long documents: an empty prefix (a cut at 0, which makes PSM look like SPM) is then rare.
        docs = [rng.integers(0, 1000, size=rng.integers(200, 400)).astype(np.uint32) for _ in range(10)]
        # A tail of 40 tokens without an end, longer than the 10 x 3 sentinels the window's cut
        # can take: every whole document survives it, whatever became of it.
        tail = rng.integers(0, 1000, size=40).astype(np.uint32)
        window = np.concatenate([np.append(d, np.uint32(TOKENS.eot)) for d in docs] + [tail])
        out = fim_window(window, window_rng(7, position), rate, spm_rate, TOKENS)
        for doc in documents_of(out):
            trials += 1
            if doc and doc[0] == TOKENS.prefix:
                fim += 1
                spm += doc[1] == TOKENS.suffix
    assert abs(fim / trials - rate) < 4 * math.sqrt(rate * (1 - rate) / trials)
    assert abs(spm / fim - spm_rate) < 4 * math.sqrt(spm_rate * (1 - spm_rate) / fim)


def test_a_window_keeps_its_length_and_rate_zero_changes_nothing():
    window = np.array([5, 6, 7, TOKENS.eot, 8, 9, TOKENS.eot, 10, 11, 12, 13], dtype=np.uint32)
    for seed in range(20):
        assert len(fim_window(window, window_rng(seed, 0), 1.0, 0.5, TOKENS)) == len(window)
    assert fim_window(window, window_rng(0, 0), 0.0, 0.5, TOKENS).tolist() == window.tolist()


def test_the_draws_are_fixed_by_the_seed_and_the_position():
    window = np.arange(100, 164, dtype=np.uint32)
    window[[10, 30, 50]] = TOKENS.eot
    same = fim_window(window, window_rng(3, 17), 0.9, 0.5, TOKENS)
    assert same.tolist() == fim_window(window, window_rng(3, 17), 0.9, 0.5, TOKENS).tolist()
    others = {tuple(fim_window(window, window_rng(seed, position), 0.9, 0.5, TOKENS).tolist())
              for seed, position in ((3, 18), (4, 17), (5, 0))}
    assert tuple(same.tolist()) not in others


def test_the_rates_are_not_part_of_what_the_shards_depend_on():
    plain = DataConfig(source="local")
    assert build_hash(plain, "cl100k_base") == build_hash(replace(plain, fim_rate=0.5, fim_spm_rate=0.1), "cl100k_base")


@pytest.mark.parametrize("key, value", [("fim_rate", "1.5"), ("fim_rate", "-0.1"), ("fim_spm_rate", "2")])
def test_a_rate_outside_zero_to_one_is_a_recipe_error_naming_the_key(key, value):
    with pytest.raises(UserError, match=rf"^<command line>: data\.{key}: must be in \[0, 1\], got {value}"):
        load_recipe(PretrainRecipe, ROOT / "recipes/pretrain-tiny.yaml", [f"data.{key}={value}"])


def test_the_middle_loss_benchmark_scores_exactly_the_middle_tokens():
    from bench.fim_quality import middle_targets

    prefix, middle, suffix = [11, 12], [21, 22, 23, 24, 25, 26], [31]
    window = np.array([TOKENS.prefix, *prefix, TOKENS.suffix, *suffix, TOKENS.middle, *middle, TOKENS.eot,
                       TOKENS.prefix, 41, TOKENS.suffix, 42, TOKENS.middle, 43, 44])
    targets = middle_targets(window, TOKENS)  # targets[i] is the label of input window[i]
    assert [int(t) for t in targets if t != -100] == [*middle, 43, 44]
    assert targets[list(window).index(TOKENS.middle)] == 21  # the first middle token, after <|fim_middle|>
    assert [int(t) for t in middle_targets(window, TOKENS, first=2) if t != -100] == [21, 22, 43, 44]
