"""The model inside the wrappers training puts around it (DDP, torch.compile), and the key
prefixes those wrappers leave in state dicts."""

from __future__ import annotations

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `_orig_mod.` (torch.compile) and `module.` (DDP) from every key."""
    clean = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        clean[key.replace("._orig_mod.", ".")] = value
    return clean
