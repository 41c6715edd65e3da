"""Shared fixtures: a tiny model that runs in milliseconds on a CPU."""

import pytest
import torch

from codegpt.base.model import GPT
from tests.helpers import tiny_config


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()
