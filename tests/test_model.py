"""The model: the seed's size and init, the KV cache and the fixed-shape decoding step against recompute, packing."""

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


def cached_logits(model, idx, cache, valid=None):
    return model.lm_head(model.cached_hidden_states(idx, cache, valid))


def test_kv_cache_logits_equal_full_forward(tiny_model):
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = tiny_model(idx)
        cache = tiny_model.new_cache(2)
        prefill = cached_logits(tiny_model, idx[:, :12], cache)
        steps = [cached_logits(tiny_model, idx[:, i : i + 1], cache) for i in range(12, 16)]
        chunk = cached_logits(tiny_model, idx[:, 16:], cache)
    cached = torch.cat([prefill, *steps, chunk], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_equal_unpadded_rows(tiny_model):
    short, long = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    valid = torch.ones_like(batch, dtype=torch.bool)
    valid[0, :4] = False
    with torch.no_grad():
        cache = tiny_model.new_cache(2)
        padded = cached_logits(tiny_model, batch, cache, valid)
        step = cached_logits(tiny_model, torch.tensor([[7], [8]]), cache)
        alone = tiny_model(torch.cat([short, torch.tensor([[7]])], 1))
    torch.testing.assert_close(padded[0, 4:], alone[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], alone[0, 5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], tiny_model(long)[0].detach(), atol=1e-5, rtol=1e-5)


def test_fixed_shape_decode_step_equals_the_cached_step(tiny_model):
    # The step a GPU captures as a CUDA graph: slot in a tensor, every slot attended under a mask.
    prompts = torch.randint(0, 512, (2, 6))
    valid = torch.ones_like(prompts, dtype=torch.bool)
    valid[0, :3] = False  # a left-padded row
    following = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        sliced, fixed = tiny_model.new_cache(2), tiny_model.new_cache(2)
        cached_logits(tiny_model, prompts, sliced, valid)
        cached_logits(tiny_model, prompts, fixed, valid)
        for i in range(following.shape[1]):
            ids = following[:, i : i + 1]
            expected = cached_logits(tiny_model, ids, sliced)
            got = tiny_model.lm_head(tiny_model.decode_step(ids, torch.tensor([fixed.length]), fixed))
            fixed.length += 1
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    whole = torch.cat([prompts[1:], following[1:]], dim=1)
    torch.testing.assert_close(got[1, -1], tiny_model(whole)[0, -1], atol=1e-5, rtol=1e-5)


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
