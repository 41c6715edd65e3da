"""Hand-written LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update.

`LoRALinear` keeps the wrapped layer's parameter names (`weight`, `bias`) and adds `lora_A`
(r x in, Kaiming-uniform) and `lora_B` (out x r, zero), so at initialisation the adapted model
computes exactly the base model. The update is scaled by alpha / r, or alpha / sqrt(r) with
rsLoRA (Kalajdzievski, 2023); dropout applies to the LoRA branch's input only.

`apply_lora` swaps the chosen modules of a model in place and freezes everything else;
`adapter_state` / `load_adapter_state` move only the adapter tensors; `merge` / `unmerge` fold
the update into the weights in float32 and back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from codegpt.base.errors import InvalidValue
from codegpt.base.errors import UserError


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # Regular expressions matched against the end of module names: c_proj matches both the
    # attention and the MLP output projections. lm_head (the tied embedding) is optional.
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    rslora: bool = False

    def validate(self) -> None:
        if self.r <= 0:
            raise InvalidValue("r", f"must be positive, got {self.r}")
        if self.alpha <= 0:
            raise InvalidValue("alpha", f"must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise InvalidValue("dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise InvalidValue("targets", "name at least one module pattern (c_attn, c_proj, c_fc, lm_head)")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as err:
                raise InvalidValue("targets", f"{pattern!r} is not a regular expression ({err})") from None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * dropout(x) A^T B^T, with W and b frozen."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self.lora_features(x) @ self.lora_B.to(x.dtype).T

    def lora_features(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * dropout(x) A^T: the r features the update reads through B."""
        return (self.lora_dropout(x) @ self.lora_A.to(x.dtype).T) * self.scaling

    def operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x', W') with x' W'^T equal to this layer's output without bias: x' = [x, lora
        features], W' = [W, B]. As the model's head (`base.model.Head.operands`), it lets the
        loss apply the adapted head chunk by chunk without its logits."""
        if self.merged:
            return x, self.weight
        return torch.cat([x, self.lora_features(x)], dim=-1), torch.cat([self.weight, self.lora_B.to(self.weight.dtype)], dim=1)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules matched by the patterns. Every pattern must match one."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = []
    for pattern in targets:
        matched = [name for name in linears if re.search(rf"(^|\.)(?:{pattern})$", name)]
        if not matched:
            kinds = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise UserError(f"lora.targets: {pattern!r} matches no linear layer (layers are named: {', '.join(kinds)})")
        chosen += [name for name in matched if name not in chosen]
    return chosen


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace the target layers with LoRALinear and freeze every other parameter. Returns the
    adapted module names."""
    names = target_names(model, config.targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), config.r, config.scaling, config.dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (`...lora_A`, `...lora_B`), ready for safetensors."""
    return {f"{name}.{p}": getattr(layer, p).detach().contiguous() for name, layer in lora_layers(model).items()
            for p in ("lora_A", "lora_B")}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: adapter tensors do not fit the model "
                        f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    layers = lora_layers(model)
    with torch.no_grad():
        for key, tensor in state.items():
            name, _, which = key.rpartition(".")
            target = getattr(layers[name], which)
            if target.shape != tensor.shape:
                raise UserError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(tensor)


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def strip_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain nn.Linear layers back: a model with no LoRA code."""
    for name, layer in lora_layers(model).items():
        if name == "lm_head" and layer.weight is getattr(getattr(model, "transformer", None), "wte", None).weight:
            raise UserError("an adapter on the tied lm_head changes the token embedding too; "
                            "it cannot be merged into a tied model (leave lm_head out of lora.targets)")
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.weight.device, dtype=layer.weight.dtype)
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
