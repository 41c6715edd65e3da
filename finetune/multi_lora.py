"""Several LoRA adapters on one base at once, applied per row of a batch and never merged, so that
requests for different adapters (or for the base) decode in the same batch, as vLLM serves them.

`MultiLoRALinear` keeps the frozen layer's `weight` and `bias` and every adapter's factors stacked:
`lora_A` (K + 1, r, in) and `lora_B` (K + 1, out, r), zero-padded to the largest rank, each B
already multiplied by its adapter's scaling, entry 0 all zeros (the base alone). Row b of a batch
computes x W^T + bias + (x A[k]^T) B[k]^T with k = `row_adapters.current[b]`, the index the
decoding engine (base/slots.py) sets in place for the rows it runs.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from codegpt.base.model import GPT
from codegpt.base.provenance import weights_hash
from codegpt.base.slots import RowAdapters
from codegpt.finetune.adapter import read_adapter_factors


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, row_adapters: RowAdapters):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dtype = base.weight.dtype
        self.register_buffer("lora_A", lora_A.to(base.weight.device, dtype))
        self.register_buffer("lora_B", lora_B.to(base.weight.device, dtype))
        self.row_adapters = row_adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        index = self.row_adapters.current
        if index is None:  # run outside an engine: the base alone
            return out
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in), a head's (B, in) too
        update = torch.bmm(torch.bmm(rows, self.lora_A[index].transpose(1, 2)), self.lora_B[index].transpose(1, 2))
        return out + update.view(out.shape)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={self.lora_A.shape[0] - 1}, "
                f"r={self.lora_A.shape[1]}")


def attach_adapters(model: GPT, paths: list[str | os.PathLike]) -> tuple[RowAdapters, list[dict]]:
    """Put the adapters at `paths` on `model`, the i-th as adapter i + 1, after checking that each
    was trained on this base (one that was not is refused, naming its file). Returns the row
    index the layers read, and each adapter's config."""
    base_hash = weights_hash(model.state_dict())
    loaded = [read_adapter_factors(model, path, base_hash) for path in paths]
    row_adapters = RowAdapters()
    names = list(dict.fromkeys(name for factors, _ in loaded for name in factors))
    for name in names:
        base = model.get_submodule(name)
        rank = max(factors[name][0].shape[0] for factors, _ in loaded if name in factors)
        lora_A = torch.zeros(len(loaded) + 1, rank, base.in_features)
        lora_B = torch.zeros(len(loaded) + 1, base.out_features, rank)
        for k, (factors, _) in enumerate(loaded, start=1):
            if name in factors:
                a, b = factors[name]
                lora_A[k, : a.shape[0]], lora_B[k, :, : b.shape[1]] = a, b
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                MultiLoRALinear(base, lora_A, lora_B, row_adapters))
    return row_adapters, [document for _, document in loaded]
