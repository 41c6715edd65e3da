"""The model: the seed's size and init, packing. (Its KV cache and decoding step: tests/test_slots.py.)"""

import pytest
import torch

from codegpt.base.model import GPT, GPTConfig


def test_seed_config_has_the_seeds_parameter_count():
    model = GPT(GPTConfig())
    assert model.num_params() == 69_560_064
    assert model.lm_head.weight is model.transformer.wte.weight
    names = {n for n, _ in model.named_parameters()}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.9.attn.c_attn.weight",
            "transformer.h.0.mlp.c_fc.bias", "transformer.ln_f.weight"} <= names


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=1000, block_size=64))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.0005
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.0005


def test_sequence_longer_than_block_size_is_refused(tiny_model):
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def test_packed_examples_compute_what_separate_rows_compute(tiny_model):
    a, b = torch.randint(0, 512, (1, 12)), torch.randint(0, 512, (1, 20))
    packed = torch.cat([a, b], dim=1)
    segments = torch.cat([torch.zeros(1, 12, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        together = tiny_model(packed, segments=segments)
        torch.testing.assert_close(together[:, :12], tiny_model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[:, 12:], tiny_model(b), atol=1e-5, rtol=1e-5)
