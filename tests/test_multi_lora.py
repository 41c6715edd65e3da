"""Several adapters on one base, applied per row: each sequence of a batch that mixes adapters
(of different ranks and layers, the head included) and the base decodes what its adapter alone
decodes, unmerged as `codegpt generate --adapter` runs it; an adapter of another base is refused
naming its file."""

import json

import pytest
import torch

from codegpt.base.checkpoint import save_model
from codegpt.base.convert import load_any
from codegpt.base.errors import UserError
from codegpt.base.generate import banned_ids, token_steps
from codegpt.base.sampling import Sampling
from codegpt.base.slots import SlotEngine
from codegpt.finetune.adapter import load_for_inference
from codegpt.finetune.lora import LoRAConfig
from codegpt.finetune.multi_lora import MultiLoRALinear, attach_adapters
from tests.helpers import varied_model, write_adapter

GREEDY = Sampling(temperature=0)
PROMPTS = ["def add(a, b):\n", "import os\n", "class Stack:\n", "x = [1, 2", "# sort the list\n", "while i < n:"]


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    w = tmp_path_factory.mktemp("adapters")
    base = varied_model(block_size=64)
    save_model(w / "base", base)
    docstring = write_adapter(w / "docstring", base, w / "base", LoRAConfig(r=4, targets=["c_attn", "c_fc"]), seed=1)
    bugfix = write_adapter(w / "bugfix", base, w / "base", LoRAConfig(r=8, alpha=4.0, targets=["c_proj", "lm_head"]),
                           seed=2)
    return w / "base", [docstring, bugfix]


def alone(model_dir, adapter, prompt, tokenizer, steps):
    model, _ = load_for_inference(model_dir, adapter)
    tokens = token_steps(model, [tokenizer.encode(prompt)], GREEDY, banned_ids(model, tokenizer, "cpu"), tokenizer.eot_id)
    return [next(tokens)[0] for _ in range(steps)]


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="needs MKL"))], ids=["usual", "packed"])
def test_each_adapter_in_a_mixed_batch_decodes_what_it_decodes_alone(base_and_adapters, tokenizer, packed):
    base_dir, paths = base_and_adapters
    model = load_any(base_dir)
    row_adapters, documents = attach_adapters(model, paths)
    assert len(documents) == 2 and isinstance(model.lm_head, MultiLoRALinear)
    engine = SlotEngine(model.eval(), 3, banned_ids(model, tokenizer, "cpu"), tokenizer.eot_id,
                        row_adapters=row_adapters, packed=packed)
    if packed:  # the adapted layers' base weights are packed too
        assert len(engine.packed.weights) == 4 * model.config.n_layer
    # Six requests through three rows, leaving at different steps: the first three prefilled
    # together (one forward, each row with its adapter), the others joining as rows free.
    waiting = [(prompt, i % 3, 8 + 3 * i) for i, prompt in enumerate(PROMPTS)]  # adapter 0: the base alone
    first, waiting = waiting[:3], waiting[3:]
    added = engine.add_many([(tokenizer.encode(prompt), GREEDY, adapter, 0) for prompt, adapter, _ in first])
    running, got = dict(zip(added, first)), {}
    while waiting or running:
        while waiting and engine.free_rows:
            prompt, adapter, length = waiting.pop(0)
            running[engine.add(tokenizer.encode(prompt), GREEDY, adapter=adapter)] = (prompt, adapter, length)
        for slot, token in engine.step():
            got.setdefault(running[slot][:2], []).append(token)
            if len(got[running[slot][:2]]) == running[slot][2]:
                engine.release(slot)
                del running[slot]
    for (prompt, adapter), tokens in got.items():
        expected = alone(base_dir, None if adapter == 0 else paths[adapter - 1], prompt, tokenizer, len(tokens))
        assert tokens == expected, (prompt, adapter)
    # The adapters change what is written, so equal tokens mean each row got its own adapter.
    for prompt in PROMPTS[:3]:
        assert len({tuple(alone(base_dir, a, prompt, tokenizer, 12)) for a in (None, *paths)}) == 3


def test_an_adapter_of_another_base_is_refused_naming_its_file(base_and_adapters, tmp_path):
    base_dir, paths = base_and_adapters
    other = tmp_path / "other"
    other.mkdir()
    for name in ("adapter.json", "adapter.safetensors"):
        (other / name).write_bytes((paths[0] / name).read_bytes())
    document = json.loads((other / "adapter.json").read_text())
    (other / "adapter.json").write_text(json.dumps({**document, "base_hash": "0" * 64}))
    with pytest.raises(UserError, match=f"^{other}: this adapter was trained on another base"):
        attach_adapters(load_any(base_dir), [paths[1], other])
