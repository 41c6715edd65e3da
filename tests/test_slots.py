"""The decoding engine: rows of one KV cache, each with its own length. Hidden states equal the
full forward's; a sequence decodes the same tokens alone or beside 7 others (greedy, and seeded
sampling), across a full context too; the fixed-shape step a GPU captures equals the eager one on
this CPU; a failed capture decodes eagerly after one warning line; `generate` captures once per
batch size, not once per call or per context refill; min_new_tokens holds <|endoftext|> back."""

import pytest
import torch

from codegpt.base import slots
from codegpt.base.generate import banned_ids, generate
from codegpt.base.sampling import Sampling
from codegpt.base.slots import SlotEngine
from tests.helpers import CountPackedProducts, varied_model

GREEDY = Sampling(temperature=0)


@pytest.fixture
def model():
    return varied_model(block_size=64)


def engine_of(model, tokenizer, rows, packed=False):
    return SlotEngine(model, rows, banned_ids(model, tokenizer, "cpu"), tokenizer.eot_id, packed=packed)


# Weights prepacked for MKL (base/packed_linear.py), used only where measured faster: forced here.
mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs MKL")
PACKING = [False, pytest.param(True, marks=mkl)]


def record_hidden(model, out: list):
    """A hook on the final LayerNorm, which every prefill and step runs once."""
    return model.transformer.ln_f.register_forward_hook(lambda module, args, output: out.append(output.detach()))


@pytest.mark.parametrize("packed", PACKING, ids=["usual", "packed"])
def test_rows_of_different_lengths_compute_what_the_full_forward_computes(model, tokenizer, packed):
    prompts = [list(range(300, 309)), [5], list(range(700, 704))]
    engine = engine_of(model, tokenizer, 3, packed)
    assert (engine.packed is not None) == packed
    seen = []
    hook = record_hidden(model, seen)
    try:
        slots_ = [engine.add(p, GREEDY) for p in prompts]
        with CountPackedProducts() as products:
            for _ in range(6):
                engine.step()
    finally:
        hook.remove()
    steps = [h[:, -1] for h in seen if h.shape[1] == 1 and h.shape[0] == 3]
    assert len(steps) == 6
    assert products.count == (6 * 4 * model.config.n_layer if packed else 0)
    with torch.no_grad():
        for row, slot in enumerate(slots_):
            for i, hidden in enumerate(steps):
                ids = slot.tokens[: len(prompts[row]) + i]
                expected = model.hidden_states(torch.tensor([ids]))[0, -1]
                torch.testing.assert_close(hidden[row], expected, atol=1e-5, rtol=1e-5)


def run_beside(model, tokenizer, ours, others, steps, rows, packed=False):
    """The tokens of `ours` (prompt, sampling) decoded for `steps` steps in an engine of `rows`
    rows, while `others` join one per step, each leaving after a few tokens and the next taking
    its row."""
    engine = engine_of(model, tokenizer, rows, packed)
    slot = engine.add(*ours)
    waiting, beside, tokens = list(others), [], []
    for step in range(steps):
        if waiting and engine.free_rows:
            beside.append((engine.add(*waiting.pop(0)), 3 + step % 5))
        for s, token in engine.step():
            if s is slot:
                tokens.append(token)
        for s, budget in list(beside):
            if s.generated >= budget:
                engine.release(s)
                beside.remove((s, budget))
    return tokens


def neighbours(tokenizer, count):
    texts = ["import os\n", "class A:\n    def", "x = [", "", "def f(a, b):\n    return", "# comment\n", "for i in"]
    samplings = [GREEDY, Sampling(temperature=0.9, seed=5), Sampling(temperature=1.0, top_k=20, seed=1),
                 Sampling(temperature=0.7, top_p=0.9)]
    return [(tokenizer.encode(texts[i % len(texts)]), samplings[i % len(samplings)]) for i in range(count)]


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(temperature=1.0, seed=11),
                                      Sampling(temperature=0.8, top_k=40, top_p=0.95, seed=3)],
                         ids=["greedy", "seeded", "seeded top-k top-p"])
@pytest.mark.parametrize("packed", PACKING, ids=["usual", "packed"])
def test_a_sequence_decodes_the_same_alone_or_beside_seven_others(model, tokenizer, sampling, packed):
    # 90 tokens from a 20-token prompt overflow the 64-position context: the row is refilled
    # from its last 3/4 on its own, while the others come and go (packed: from 6 rows in use
    # the step runs all 8, the free ones as padding).
    ours = (tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n"), sampling)
    alone = run_beside(model, tokenizer, ours, [], steps=90, rows=1)
    beside = run_beside(model, tokenizer, ours, neighbours(tokenizer, 40), steps=90, rows=8, packed=packed)
    assert len(set(alone)) > 10  # the test is only as good as the text is varied
    assert beside == alone


def test_a_seeds_draws_differ_from_another_seeds(model, tokenizer):
    prompt = tokenizer.encode("x = ")
    first = run_beside(model, tokenizer, (prompt, Sampling(temperature=1.0, seed=1)), [], steps=20, rows=1)
    second = run_beside(model, tokenizer, (prompt, Sampling(temperature=1.0, seed=2)), [], steps=20, rows=1)
    assert first != second


def replay_eagerly(step, device):
    """What `capture_graph` returns, on a CPU: replaying recomputes the captured output in place."""
    output = step()
    return (lambda: output.copy_(step())), output


def test_the_fixed_shape_step_equals_the_eager_step(model, tokenizer, monkeypatch):
    """The graph path on this CPU: every row at every position, the step reading only tensors
    set in place, as a CUDA graph replays it."""
    eager = engine_of(model, tokenizer, 4)
    monkeypatch.setattr(slots, "graphs_available", lambda device: True)
    monkeypatch.setattr(slots, "capture_graph", replay_eagerly)
    fixed = engine_of(model, tokenizer, 4)
    assert fixed.replay is not None and eager.replay is None and fixed.capture_seconds is not None
    outputs = {}
    for name, engine in (("eager", eager), ("fixed", fixed)):
        tokens, hidden = [], []
        first = engine.add(tokenizer.encode("def parse(text):\n"), GREEDY)
        engine.add(tokenizer.encode("import sys"), Sampling(temperature=1.0, seed=4))
        for step in range(70):  # past the 64-position context
            if step == 5:
                engine.release(first)
            if step == 9:
                engine.add(tokenizer.encode("while True:"), GREEDY)
            seen = []
            hook = record_hidden(model, seen)
            tokens.append([(s.row, t) for s, t in engine.step()])
            hook.remove()
            hidden.append(next(h for h in seen if h.shape[1] == 1)[:2, -1])  # not a context refill's
        outputs[name] = tokens, hidden
    assert outputs["fixed"][0] == outputs["eager"][0]
    assert len(outputs["fixed"][1]) == len(outputs["eager"][1]) == 70
    for got, expected in zip(*(outputs[name][1] for name in ("fixed", "eager"))):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_failed_capture_decodes_eagerly_after_one_warning_line(model, tokenizer, monkeypatch, capsys):
    expected = generate(model, tokenizer, ["def f(x):"], Sampling(max_new_tokens=20, temperature=0))

    def fail(step, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(slots, "graphs_available", lambda device: True)
    monkeypatch.setattr(slots, "capture_graph", fail)
    capsys.readouterr()
    engine = engine_of(model, tokenizer, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: capturing the decoding step as a CUDA graph failed")
    assert "operation not permitted" in err and engine.replay is None and engine.capture_seconds is None
    slot = engine.add(tokenizer.encode("def f(x):"), GREEDY)
    tokens = [next(t for s, t in engine.step() if s is slot) for _ in range(20)]
    assert tokenizer.decode(tokens).startswith(expected[0]) and expected[0]


def test_generate_captures_once_per_batch_size(model, tokenizer, monkeypatch):
    captures = []

    def counting(step, device):
        captures.append(1)
        return replay_eagerly(step, device)

    monkeypatch.setattr(slots, "graphs_available", lambda device: True)
    monkeypatch.setattr(slots, "capture_graph", counting)
    sampling = Sampling(max_new_tokens=100, temperature=0)  # refills the 64-position context
    first = generate(model, tokenizer, ["def f():"], sampling)
    assert generate(model, tokenizer, ["def f():"], sampling) == first
    generate(model, tokenizer, ["def g():"], Sampling(max_new_tokens=5, temperature=0.5, seed=0))
    assert len(captures) == 1
    generate(model, tokenizer, ["a", "b"], Sampling(max_new_tokens=3))
    generate(model, tokenizer, ["c", "d"], Sampling(max_new_tokens=3))
    assert len(captures) == 2
    model.double()  # the weights moved: a graph reading the old ones would be wrong
    generate(model, tokenizer, ["def f():"], Sampling(max_new_tokens=3))
    assert len(captures) == 3


def test_a_full_engine_says_so(model, tokenizer):
    engine = engine_of(model, tokenizer, 2)
    with pytest.raises(RuntimeError, match="^3 sequences, but only 2 of 2 rows are free$"):
        engine.add_many([([1], GREEDY, 0, 0)] * 3)
    with pytest.raises(ValueError, match="token id 100352 is outside"):
        engine.add_many([([1], GREEDY, 0, 0), ([100_352], GREEDY, 0, 0)])
    assert engine.free_rows == 2  # a refused batch takes no row
    engine.add_many([([1, 2], GREEDY, 0, 0), ([3], GREEDY, 0, 0)])
    with pytest.raises(RuntimeError, match="all 2 rows are in use"):
        engine.add([3], GREEDY)


@pytest.mark.parametrize("neighbour", [None, Sampling(temperature=1.0, seed=0)], ids=["greedy batch", "mixed batch"])
def test_min_new_tokens_holds_endoftext_back(model, tokenizer, neighbour):
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eot_id] = model.transformer.ln_f(torch.ones(32)) * 50  # it always wins
    engine = engine_of(model, tokenizer, 2)
    held = engine.add(tokenizer.encode("x = 1"), GREEDY, min_new_tokens=5)
    free = engine.add(tokenizer.encode("y = 2"), GREEDY if neighbour is None else neighbour)
    steps = [dict(engine.step()) for _ in range(6)]
    assert tokenizer.eot_id not in [step[held] for step in steps[:5]] and steps[5][held] == tokenizer.eot_id
    assert steps[0][free] == tokenizer.eot_id or neighbour is not None  # without min_new_tokens it ends at once
