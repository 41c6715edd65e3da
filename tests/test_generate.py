"""Generation: the KV cache gives the same greedy tokens as recomputing, batches equal single
prompts, stop strings cut, streamed pieces equal the final text, sampling options behave, and the
bf16-ranked decode head gives the plain head's logits and tokens."""

import pytest
import torch

from codegpt.base.errors import UserError
from codegpt.base import decode_head
from codegpt.base.decode_head import next_token_head
from codegpt.base.generate import banned_ids, generate, stream
from codegpt.base.sampling import MAX_SEED, MIN_TEMPERATURE, Sampling, sample_next
from tests.helpers import varied_model
from codegpt.base.model import GPT


@pytest.fixture
def model():
    return varied_model(std=0.5, block_size=96)


def greedy_by_recomputing(model, tokenizer, prompt, n):
    ids = tokenizer.encode(prompt)
    banned = banned_ids(model, tokenizer, "cpu")
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[:, -1].masked_fill(banned, float("-inf"))
            ids.append(logits.argmax(-1).item())
            out.append(ids[-1])
    return out


def test_greedy_with_cache_equals_recomputing(model, tokenizer):
    prompt = "def fibonacci(n):\n"
    n = 96 - len(tokenizer.encode(prompt))
    expected = tokenizer.decode(greedy_by_recomputing(model, tokenizer, prompt, n))
    assert len(set(expected.split())) > 3  # the test is only as good as the text is varied
    assert generate(model, tokenizer, [prompt], Sampling(max_new_tokens=n, temperature=0)) == [expected]


def test_batch_of_prompts_equals_each_prompt_alone(model, tokenizer):
    prompts = ["import os\n\nclass Config:\n", "x = 1", "def f():"]
    sampling = Sampling(max_new_tokens=30, temperature=0)
    assert generate(model, tokenizer, prompts, sampling) == [generate(model, tokenizer, [p], sampling)[0] for p in prompts]


def test_generation_continues_past_the_context(model, tokenizer):
    text = generate(model, tokenizer, ["def f():"], Sampling(max_new_tokens=200, temperature=0))[0]
    assert len(tokenizer.encode(text)) >= 150


def test_stop_strings_cut_and_streamed_pieces_equal_the_result(model, tokenizer):
    free = generate(model, tokenizer, ["def f():"], Sampling(max_new_tokens=40, temperature=0))[0]
    stop = free[20:23]
    assert stop and stop in free
    sampling = Sampling(max_new_tokens=40, temperature=0, stop=[stop, "never appears"])
    pieces = [piece for _, piece in stream(model, tokenizer, ["def f():"], sampling)]
    assert "".join(pieces) == free[: free.index(stop)]
    assert len(pieces) > 1


def test_seeded_sampling_is_reproducible(model, tokenizer):
    sampling = Sampling(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first = generate(model, tokenizer, ["a = ", "b = "], sampling)
    assert first == generate(model, tokenizer, ["a = ", "b = "], sampling)
    assert first != generate(model, tokenizer, ["a = ", "b = "], Sampling(**{**sampling.__dict__, "seed": 8}))


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, Sampling(temperature=1.0, top_k=2), g).tolist()) == {0, 1}
    assert set(sample_next(logits, Sampling(temperature=1.0, top_p=0.5), g).tolist()) == {0}
    assert set(sample_next(logits, Sampling(temperature=1.0, top_p=0.99), g).tolist()) == {0, 1}
    assert set(sample_next(logits, Sampling(temperature=0.0), g).tolist()) == {0}


def test_padding_ids_are_never_sampled(model, tokenizer):
    with torch.no_grad():
        model.lm_head.weight[100_300:] += 5.0  # make the padding rows the most likely
    text = generate(model, tokenizer, ["x"], Sampling(max_new_tokens=10, temperature=0))[0]
    assert text and "\ufffd" not in text


@pytest.mark.parametrize("bad,field", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                       (dict(top_k=0), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
                                       # overflow into NaN probabilities, or out of torch.Generator's range
                                       (dict(temperature=1e-40), "temperature"),
                                       (dict(temperature=float("nan")), "temperature"),
                                       (dict(temperature=float("inf")), "temperature"),
                                       (dict(seed=2**70), "seed"), (dict(seed=-1), "seed")])
def test_bad_options_name_the_option(model, tokenizer, bad, field):
    with pytest.raises(UserError, match=f"^{field}: "):
        generate(model, tokenizer, ["x"], Sampling(**bad))


def test_the_smallest_temperature_and_the_largest_seed_work(model, tokenizer):
    sampling = Sampling(max_new_tokens=5, temperature=MIN_TEMPERATURE, seed=MAX_SEED)
    assert generate(model, tokenizer, ["x"], sampling) == generate(model, tokenizer, ["x"],
                                                                    Sampling(max_new_tokens=5, temperature=0))


RANKERS = {"plain": lambda weight: None, "int8": decode_head.int8_ranker, "bf16": decode_head.bf16_ranker}


@pytest.mark.parametrize("ranker", RANKERS)
def test_decode_head_gives_exact_logits_for_its_candidates(model, tokenizer, monkeypatch, ranker):
    monkeypatch.setattr(decode_head, "ranker_for", RANKERS[ranker])
    banned = banned_ids(model, tokenizer, "cpu")
    with torch.no_grad():  # a batch of rows, as the engine's step ranks them
        ids = torch.tensor([tokenizer.encode("import os\n"), tokenizer.encode("x = [")])
        hidden = model.hidden_states(ids)[:, -1]
        exact = model.lm_head(hidden).masked_fill(banned, float("-inf"))
        greedy = next_token_head(model, 1, banned)(hidden)
        unrestricted = next_token_head(model, None, banned)(hidden)
    torch.testing.assert_close(unrestricted, exact)  # sampling from the whole vocabulary: the plain head
    kept = torch.isfinite(greedy)
    for row in range(2):
        assert kept[row].sum() == (exact[row].isfinite().sum() if ranker == "plain" else decode_head.CANDIDATES)
        assert set(exact[row].topk(50).indices.tolist()) <= set(kept[row].nonzero().flatten().tolist())
    torch.testing.assert_close(greedy[kept], exact[kept])
    if ranker != "plain":  # greedy decoding reads only each row's candidates and their exact logits
        candidates, logits = next_token_head(model, 1, banned).top(hidden)
        torch.testing.assert_close(logits, exact.gather(1, candidates))
        assert candidates.gather(1, logits.argmax(1, keepdim=True))[:, 0].tolist() == exact.argmax(1).tolist()


def test_top_indices_by_blocks_are_topks():
    scores = torch.randn(3, 100_352, generator=torch.Generator().manual_seed(0))
    scores[0, ::3] = float("-inf")  # banned ids
    scores[1, :100_300] = float("-inf")  # fewer than 128 allowed ids: the rest are -inf, as topk gives them
    scores[2, 5_000:5_128] += 10  # the best all in one block
    expected = scores.topk(128, dim=-1)
    got = decode_head.top_indices(scores, 128)
    assert torch.equal(scores.gather(1, got), expected.values)
    assert torch.equal(got[0], expected.indices[0]) and torch.equal(got[2], expected.indices[2])
    narrow = scores[:, :1000]  # too narrow for blocks to pay: topk itself
    assert torch.equal(decode_head.top_indices(narrow, 128), narrow.topk(128, dim=-1).indices)


@pytest.mark.parametrize("ranker", ["int8", "bf16"])
def test_ranked_head_decodes_the_same_tokens_as_the_plain_head(model, tokenizer, monkeypatch, ranker):
    outputs = {}
    for name in ("plain", ranker):
        monkeypatch.setattr(decode_head, "ranker_for", RANKERS[name])
        outputs[name] = [generate(model, tokenizer, ["def parse(text):\n"], sampling)[0] for sampling in
                         (Sampling(max_new_tokens=40, temperature=0), Sampling(max_new_tokens=40, top_k=50, seed=3))]
    assert outputs[ranker] == outputs["plain"]


def test_the_ranking_copy_is_built_once_and_rebuilt_when_the_weight_changes():
    weight = torch.randn(300, 16)
    first = decode_head.ranker_for(weight)
    assert decode_head.ranker_for(weight) is first
    with torch.no_grad():
        weight.add_(1.0)
    assert first is None or decode_head.ranker_for(weight) is not first


@pytest.mark.parametrize("capability, fast", [("AVX512", True), ("AVX2", False), ("DEFAULT", False)])
def test_bf16_counts_as_fast_only_where_pytorch_may_use_avx512(monkeypatch, capability, fast):
    # A CPU with AVX512-BF16 run as ATEN_CPU_CAPABILITY=avx2 (how an AVX2 machine is approximated)
    # emulates bf16, some 100x slower than fp32: the benchmarks must not pick it there.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert decode_head.has_fast_bf16(torch.device("cpu")) is fast
    assert not decode_head.has_fast_bf16(torch.device("meta"))


def test_weights_changed_in_place_decode_as_a_fresh_model_does(model, tokenizer):
    """The engine `generate` keeps between calls, and its ranked head, follow weights trained or
    edited in place after a first generation (the int8 ranking copy is rebuilt, not reused)."""
    sampling = Sampling(max_new_tokens=30, temperature=0)
    before = generate(model, tokenizer, ["def parse(text):\n"], sampling)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.randn_like(model.transformer.wte.weight) * 0.5)
    fresh = GPT(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    after = generate(model, tokenizer, ["def parse(text):\n"], sampling)
    assert after == generate(fresh, tokenizer, ["def parse(text):\n"], sampling) and after != before
