"""Block weights prepacked for MKL: inside the mode every product over a packed weight (a plain
layer or a LoRA layer) equals the usual one, the head's is untouched, a weight changed in place
is packed again, and nothing is packed where MKL cannot serve (one row, bf16, no MKL)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from codegpt.base import packed_linear
from codegpt.base.packed_linear import PackedLinears, body_weights, packed_linears
from codegpt.finetune.lora import LoRAConfig, apply_lora
from tests.helpers import CountPackedProducts, varied_model

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs MKL")


def test_packed_products_equal_the_usual_ones_and_leave_the_rest_alone():
    model = varied_model(n_embd=64)
    weights = body_weights(model)
    assert len(weights) == 4 * model.config.n_layer  # c_attn, attention c_proj, c_fc, MLP c_proj
    packed = PackedLinears(weights, rows=4)
    with torch.no_grad():
        x = torch.randn(4, 1, 64)
        layer = model.transformer.h[0].attn.c_attn
        usual, head_usual = layer(x), model.lm_head(x)
        with CountPackedProducts() as products, packed:
            ours, head_ours = layer(x), model.lm_head(x)
    assert products.count == 1
    torch.testing.assert_close(ours, usual, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ours, torch.zeros_like(ours))
    assert torch.equal(head_ours, head_usual)  # the head's weight is not packed: the usual path, to the bit


def test_a_lora_layer_over_a_packed_weight_adds_its_product_to_the_packed_one():
    model = copy.deepcopy(varied_model(n_embd=64))
    apply_lora(model, LoRAConfig(r=4, targets=["c_fc"]))
    model.eval()
    layer = model.transformer.h[1].mlp.c_fc
    with torch.no_grad():
        layer.lora_B.normal_()
        x = torch.randn(4, 1, 64)
        usual = layer(x)
        with PackedLinears(body_weights(model), rows=4):
            ours = layer(x)
    torch.testing.assert_close(ours, usual, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("change", ["in place", "new storage", "to float64"])
def test_a_changed_weight_is_packed_again_or_left_to_the_usual_path(change):
    model = varied_model(n_embd=64)
    packed = PackedLinears(body_weights(model), rows=2)
    layer = model.transformer.h[0].mlp.c_proj
    with torch.no_grad():
        if change == "in place":
            layer.weight.mul_(-3)
        elif change == "new storage":
            layer.weight.data = -3 * layer.weight.data
        else:
            layer.double()
        x = torch.randn(2, 1, 4 * 64, dtype=layer.weight.dtype)
        packed.refresh()
        with packed:
            ours = layer(x)
        torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)


def test_padding_serves_from_three_quarters_of_the_rows():
    packed = PackedLinears(body_weights(varied_model()), rows=8)
    assert [n for n in range(1, 9) if packed.serves(n)] == [6, 7, 8]


def test_nothing_is_packed_where_mkl_cannot_serve(monkeypatch):
    model = varied_model()
    assert packed_linears(model, rows=1) is None  # one row: MKL's matrix-vector path
    assert packed_linears(copy.deepcopy(model).to(torch.bfloat16), rows=8) is None
    monkeypatch.setattr(packed_linear.torch.backends.mkl, "is_available", lambda: False)
    assert packed_linears(model, rows=8) is None
