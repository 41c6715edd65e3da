"""LoRA adapters on disk, and loading a model that may carry one.

An adapter directory holds `adapter.safetensors` (only the lora_A / lora_B tensors) and
`adapter.json`: the LoRA settings, the adapted module names, the base checkpoint it was trained
on (an absolute path, so the adapter finds it from any working directory) and a hash of that
base's weights. Loading refuses a base with another hash.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from codegpt.base.checkpoint import check_dtypes, read_safetensors

from codegpt.base.convert import load_any

from codegpt.base.provenance import provenance, weights_hash

from codegpt.base.wrappers import unwrap
from codegpt.base.recipe_loader import build_in_file
from codegpt.base.errors import UserError
from codegpt.base.fileio import atomic_write_text, read_json
from codegpt.base.model import GPT
from codegpt.finetune.lora import LoRAConfig, adapter_state, apply_lora, load_adapter_state, target_names

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = "codegpt-adapter"


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def write_adapter_files(directory: Path, model: torch.nn.Module, lora: LoRAConfig, base: str, base_hash: str,
                        meta: dict | None = None) -> None:
    save_file(adapter_state(unwrap(model)), Path(directory) / ADAPTER_FILE, metadata={"format": "pt"})
    # fim: the adapter was trained on fill-in-the-middle examples, whatever its base was.
    document = {"format": FORMAT, "lora": dataclasses.asdict(lora), "base": str(Path(base).resolve()), "base_hash": base_hash,
                "fim": unwrap(model).config.fim, "provenance": meta if meta is not None else provenance()}
    atomic_write_text(Path(directory) / ADAPTER_CONFIG, json.dumps(document, indent=2) + "\n")


def read_adapter_config(path: str | os.PathLike) -> dict:
    config_path = Path(path) / ADAPTER_CONFIG
    document = read_json(config_path, f"{path}: not an adapter (no {ADAPTER_CONFIG})")
    if document.get("format") != FORMAT:
        raise UserError(f"{config_path}: not a CodeGPT adapter")
    for key, kind in (("base", str), ("base_hash", str), ("lora", dict)):
        if not isinstance(document.get(key), kind):
            raise UserError(f"{config_path}: {key}: missing or not a {'string' if kind is str else 'mapping'}")
    return document


def read_adapter_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load the adapter tensors of `path` into a model that already has LoRA layers."""
    state = read_safetensors(Path(path) / ADAPTER_FILE)
    check_dtypes(state, adapter_state(unwrap(model)), Path(path) / ADAPTER_FILE)
    load_adapter_state(unwrap(model), state, source=str(path))


def check_base(path: str | os.PathLike, document: dict, actual_hash: str) -> None:
    """Refuse a base other than the one the adapter at `path` (its config `document`) was trained on."""
    expected = document["base_hash"]
    if actual_hash != expected:
        raise UserError(f"{path}: this adapter was trained on another base ({document['base']}, weights hash "
                        f"{expected[:12]}); the model given has hash {actual_hash[:12]}")


def attach_adapter(model: GPT, path: str | os.PathLike, base_hash: str | None = None) -> GPT:
    """Add the LoRA layers of the adapter at `path` to `model` and load their weights, after
    checking that `model` is the base the adapter was trained on."""
    document = read_adapter_config(path)
    check_base(path, document, base_hash or weights_hash(model.state_dict()))
    apply_lora(model, build_in_file(LoRAConfig, document["lora"], Path(path) / ADAPTER_CONFIG, "lora."))
    read_adapter_weights(path, model)
    model.config.fim = model.config.fim or document.get("fim") is True
    return model.eval()


def read_adapter_factors(model: GPT, path: str | os.PathLike,
                         base_hash: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """The adapter at `path`, for a model that serves several at once (finetune/multi_lora.py):
    {module name: (A (r x in), scaling * B (out x r))} and its config, after checking that
    `model` (whose weights hash is `base_hash`) is its base and that its tensors fit the model."""
    document = read_adapter_config(path)
    check_base(path, document, base_hash)
    lora = build_in_file(LoRAConfig, document["lora"], Path(path) / ADAPTER_CONFIG, "lora.")
    lora.validate()
    shapes = {}
    for name in target_names(model, lora.targets):
        layer = model.get_submodule(name)
        shapes[f"{name}.lora_A"], shapes[f"{name}.lora_B"] = (lora.r, layer.in_features), (layer.out_features, lora.r)
    source = Path(path) / ADAPTER_FILE
    state = read_safetensors(source)
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise UserError(f"{source}: adapter tensors do not fit the model "
                        f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape or not state[key].is_floating_point():
            raise UserError(f"{source}: {key} is {state[key].dtype} of shape {tuple(state[key].shape)}, "
                            f"the model expects floating point of shape {shape}")
    factors = {key[: -len(".lora_A")]: (state[key].float(), state[key[:-1] + "B"].float() * lora.scaling)
               for key in shapes if key.endswith(".lora_A")}
    return factors, document


def load_for_inference(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None,
                       device="cpu") -> tuple[GPT, str]:
    """A model for sampling or evaluation: a base (any format the importers read), a merged
    model, or a base plus adapter. An adapter directory given as the model brings its own base.
    Returns the model and a one-line description of what was loaded."""
    named_by = ""
    if adapter is None and is_adapter(model_path):
        adapter, model_path = model_path, read_adapter_config(model_path)["base"]
        named_by = f" (the base {Path(adapter) / ADAPTER_CONFIG} names)"
    if not Path(model_path).exists():
        raise UserError(f"{model_path}: base model not found{named_by}")
    model = load_any(model_path)
    description = f"{model_path} ({model.num_params():,} parameters)"
    if adapter is not None:
        attach_adapter(model, adapter)
        description += f" + adapter {adapter}"
    return model.to(device).eval(), description
