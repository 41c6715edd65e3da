"""LoRA: identity at init, merge equals unmerged, unmerge restores, the standard formulation
(checked against peft), only adapters train, only adapters are saved, and clear refusals."""

import math

import pytest
import torch
import torch.nn as nn

from codegpt.base.errors import UserError
from codegpt.base.model import GPT
from tests.helpers import tiny_config
from codegpt.finetune.lora import (LoRAConfig, LoRALinear, adapter_state, apply_lora, load_adapter_state, merge,
                           strip_lora, unmerge)


def adapted(targets=("c_attn", "c_proj", "c_fc"), **lora):
    torch.manual_seed(0)
    base = GPT(tiny_config()).eval()
    model = GPT(tiny_config()).eval()
    model.load_state_dict(base.state_dict())
    apply_lora(model, LoRAConfig(targets=list(targets), dropout=0.0, **lora))
    return base, model


def randomize_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def test_at_init_the_adapted_model_equals_the_base():
    base, model = adapted()
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


def test_only_adapters_train_and_keep_base_names():
    _, model = adapted()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    names = {n for n, _ in model.named_parameters()}
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_fc.bias" in names
    assert len([n for n in trainable if n.endswith("lora_A")]) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj


def test_merged_equals_unmerged_and_unmerge_restores_weights():
    base, model = adapted()
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        unmerged = model(idx)
        merge(model)
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.equal(model(idx), base(idx))
        unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)


def test_stripped_model_is_a_plain_gpt_with_the_adapted_outputs():
    _, model = adapted()
    randomize_adapters(model)
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        expected = model(idx)
        plain = strip_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())
        torch.testing.assert_close(plain(idx), expected, atol=1e-5, rtol=1e-5)
    assert set(plain.state_dict()) == set(GPT(tiny_config()).state_dict())


def test_adapted_head_in_the_chunked_loss_equals_its_logits():
    _, model = adapted(targets=("c_attn", "lm_head"))
    randomize_adapters(model)
    idx, targets = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    loss = model(idx, targets)
    reference = nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - reference.item()) < 1e-5
    loss.backward()
    assert model.lm_head.lora_A.grad.abs().sum() > 0 and model.lm_head.lora_B.grad.abs().sum() > 0
    with pytest.raises(UserError, match="tied lm_head"):
        strip_lora(model)


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_on_an_equivalent_linear(rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("c_attn", nn.Linear(16, 24))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], use_rslora=rslora)
    reference = peft.get_peft_model(base, config)
    layer = reference.base_model.model.c_attn
    ours = LoRALinear(nn.Linear(16, 24), r=4, scaling=LoRAConfig(r=4, alpha=8, rslora=rslora).scaling, dropout=0.0)
    assert ours.scaling == pytest.approx(layer.scaling["default"]) == pytest.approx(8 / (2 if rslora else 4))
    # The same initialisation: A Kaiming-uniform with a=sqrt(5) (bound 1/sqrt(in)), B zero.
    torch.manual_seed(1)
    nn.init.kaiming_uniform_(ours.lora_A, a=math.sqrt(5))
    torch.manual_seed(1)
    nn.init.kaiming_uniform_(layer.lora_A["default"].weight, a=math.sqrt(5))
    assert torch.equal(ours.lora_A, layer.lora_A["default"].weight)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0 and torch.count_nonzero(ours.lora_B) == 0
    with torch.no_grad():
        ours.weight.copy_(layer.base_layer.weight)
        ours.bias.copy_(layer.base_layer.bias)
        ours.lora_B.normal_()
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_adapter_state_round_trips_alone():
    _, model = adapted()
    randomize_adapters(model)
    state = adapter_state(model)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    _, other = adapted()
    load_adapter_state(other, state)
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(other(idx), model(idx))


def test_refusals_name_the_problem():
    with pytest.raises(UserError, match=r"lora.targets: 'q_proj' matches no linear layer"):
        apply_lora(GPT(tiny_config()), LoRAConfig(targets=["q_proj"]))
    from codegpt.base.errors import InvalidValue

    with pytest.raises(InvalidValue, match="must be positive"):
        LoRAConfig(r=0).validate()
