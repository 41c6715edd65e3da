"""Shared fixtures: a tiny model that runs in milliseconds on a CPU, and the tokenizer."""

import pytest
import torch

from codegpt.base.model import GPT
from codegpt.base.tokenizer import Tokenizer
from tests.helpers import tiny_config


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()
