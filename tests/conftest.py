"""Shared fixtures: tiny model configs that run in milliseconds on a CPU."""

import pytest
import torch

from base.model import GPT, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    settings = dict(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    settings.update(overrides)
    return GPTConfig(**settings)


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()
