"""The model: the seed's size, the chunked loss against the naive one, the KV cache against recompute."""

import pytest
import torch
import torch.nn.functional as F

from base.model import GPT, GPTConfig, chunked_cross_entropy
from conftest import tiny_config


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


def naive_loss(model, idx, targets):
    logits = model(idx)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_the_naive_loss(chunk):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    model.loss_chunk_size = chunk
    idx = torch.randint(0, 512, (3, 32))
    targets = torch.randint(0, 512, (3, 32))
    targets[0, :11] = -100
    loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = naive_loss(model, idx, targets)
    reference.backward()
    assert abs(loss.item() - reference.item()) < 1e-5
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_chunked_loss_without_grad_equals_with_grad():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        no_grad = model(idx, targets)
    assert abs(no_grad.item() - model(idx, targets).item()) < 1e-6


def test_all_labels_ignored_gives_zero_loss_and_zero_gradient():
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = chunked_cross_entropy(x, w, torch.full((5,), -100), chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_chunked_loss_of_a_confidently_wrong_row_is_exact():
    # Logits hundreds apart: the target's probability underflows to 0 in fp32, and its loss
    # (hundreds of nats) must still come out exact, as must the gradients.
    torch.manual_seed(0)
    x = (torch.randn(6, 8) * 60).requires_grad_()
    w = torch.randn(11, 8).requires_grad_()
    t = torch.randint(0, 11, (6,))
    loss = chunked_cross_entropy(x, w, t, chunk_size=4)
    loss.backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference = F.cross_entropy(x_ref @ w_ref.T, t)
    reference.backward()
    assert reference.item() > 100
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_chunked_loss_under_autocast_runs_the_head_in_the_autocast_dtype():
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(1000, 16, requires_grad=True)
    t = torch.randint(0, 1000, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(x, w, t, chunk_size=16)
    loss.backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    bf16_logits = (x.detach().bfloat16() @ w.detach().bfloat16().T).float()
    fp32_loss = F.cross_entropy(x.detach() @ w.detach().T, t)
    torch.testing.assert_close(loss, F.cross_entropy(bf16_logits, t), atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - fp32_loss.item()) > 1e-4


def test_chunked_loss_backward_scales_with_upstream_gradient():
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (6,))
    assert torch.autograd.gradcheck(lambda a, b: 3.0 * chunked_cross_entropy(a, b, t, 4), (x, w))


def test_kv_cache_logits_equal_full_forward(tiny_model):
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = tiny_model(idx)
        cache = tiny_model.new_cache(2)
        prefill = tiny_model(idx[:, :12], cache=cache)
        steps = [tiny_model(idx[:, i : i + 1], cache=cache) for i in range(12, 16)]
        chunk = tiny_model(idx[:, 16:], cache=cache)
    cached = torch.cat([prefill, *steps, chunk], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_equal_unpadded_rows(tiny_model):
    short, long = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    valid = torch.ones_like(batch, dtype=torch.bool)
    valid[0, :4] = False
    with torch.no_grad():
        cache = tiny_model.new_cache(2)
        padded = tiny_model(batch, cache=cache, valid=valid)
        step = tiny_model(torch.tensor([[7], [8]]), cache=cache)
        alone = tiny_model(torch.cat([short, torch.tensor([[7]])], 1))
    torch.testing.assert_close(padded[0, 4:], alone[0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], alone[0, 5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], tiny_model(long)[0].detach(), atol=1e-5, rtol=1e-5)


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
