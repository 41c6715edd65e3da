"""CodeGPT's model format: a directory written whole under a temporary name and renamed into place.

It holds `config.json` (format, model config, tokenizer, provenance) and `model.safetensors` (the
state dict; the head is tied to `transformer.wte.weight` and not stored twice). Training runs add
their own files to the same directory (see base/train.py). Other formats come in and go out
through base/convert.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from codegpt.base.errors import UserError
from codegpt.base.fileio import atomic_directory, atomic_write_text, check_input_file, read_json, recover
from codegpt.base.footprint import memory_problem
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.provenance import TIED_KEY, provenance
from codegpt.base.recipe_loader import build_in_file
from codegpt.base.tokenizer import ENCODING
from codegpt.base.wrappers import strip_prefixes, unwrap

FORMAT = "codegpt"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: no tied duplicate, no wrapper prefixes, contiguous tensors."""
    state = strip_prefixes(model.state_dict())
    state.pop(TIED_KEY, None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_model_files(directory: Path, model: GPT, *, tokenizer: str = ENCODING, meta: dict | None = None) -> None:
    """config.json and model.safetensors of `model` into an existing `directory`."""
    config = unwrap(model).config
    save_file(model_state(unwrap(model)), Path(directory) / WEIGHTS_FILE, metadata={"format": "pt"})
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(config),
        "tokenizer": tokenizer,
        "provenance": meta if meta is not None else provenance(),
    }
    atomic_write_text(Path(directory) / CONFIG_FILE, json.dumps(document, indent=2) + "\n")


def save_model(path: str | os.PathLike, model: GPT, *, tokenizer: str = ENCODING, meta: dict | None = None,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Write `model` as a CodeGPT directory at `path`, atomically. `extra(tmp_dir)` may add files
    (training state, recipe) that must appear together with the weights."""
    path = Path(path)
    size = sum(t.nbytes for t in model_state(unwrap(model)).values())
    with atomic_directory(path, size=size) as tmp:
        write_model_files(tmp, model, tokenizer=tokenizer, meta=meta)
        if extra is not None:
            extra(tmp)
    return path


def read_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load the model.safetensors of a CodeGPT directory into `model` in place (exact keys)."""
    state = read_safetensors(Path(path) / WEIGHTS_FILE)
    state.setdefault(TIED_KEY, state.get("transformer.wte.weight"))
    check_dtypes(state, unwrap(model).state_dict(), Path(path) / WEIGHTS_FILE)
    unwrap(model).load_state_dict(state)


def read_config(path: str | os.PathLike) -> dict:
    """The parsed `config.json` of a CodeGPT directory, checked to be ours."""
    path = Path(path)
    recover(path)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint directory")
    document = read_json(config_path, f"{path}: not a checkpoint (no {CONFIG_FILE})")
    if document.get("format") != FORMAT:
        raise UserError(f"{config_path}: not a CodeGPT checkpoint (format is {document.get('format')!r}); "
                        "convert it with `codegpt convert`")
    return document


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a CodeGPT directory written by `save_model`."""
    path = Path(path)
    document = read_config(path)
    config = build_in_file(GPTConfig, document.get("model", {}), path / CONFIG_FILE, "model.")
    _check_fits(config, path / CONFIG_FILE)  # before reading weights that may be as large
    state = read_safetensors(path / WEIGHTS_FILE)
    return model_from_state(config, state, str(path), device, dtype)


def _check_fits(config: GPTConfig, source) -> None:
    if (problem := memory_problem(config)) is not None:
        raise UserError(f"{source}: model.{problem[0]}: {problem[1]}")


def model_from_state(config: GPTConfig, state: dict, source: str, device="cpu", dtype=None) -> GPT:
    """A model of `config` holding `state` (our names, the tied head optional); a missing,
    unexpected or misshapen weight is a UserError naming it and `source`."""
    _check_fits(config, source)
    model = GPT(config)
    state = dict(state)
    state.setdefault(TIED_KEY, state.get("transformer.wte.weight"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise UserError(f"{source}: missing weights {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        raise UserError(f"{source}: unexpected weights {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                            f"the config implies {tuple(tensor.shape)}")
    check_dtypes(state, expected, source)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or damaged (truncated) one, or a device or
    FIFO in its place, is a UserError."""
    check_input_file(path, "weights file")
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: weights file missing") from None
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: unreadable safetensors file ({err})") from None
    return state


def check_dtypes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source) -> None:
    """Refuse a tensor of `state` whose kind differs from the model's tensor of that name: integer
    weights (load_state_dict would cast an int32 tensor to float and the model would sample
    garbage), or a float where the model keeps integers (`active_ids`). Any floating dtype
    (float32, float16, bfloat16) stands for any other: it is cast on load."""
    for key, tensor in state.items():
        if key in expected and tensor.is_floating_point() != expected[key].is_floating_point():
            wanted = "floating point (float32, float16 or bfloat16)" if expected[key].is_floating_point() \
                else f"integer ({str(expected[key].dtype).removeprefix('torch.')})"
            raise UserError(f"{source}: {key} is {str(tensor.dtype).removeprefix('torch.')}; the model's {key} is "
                            f"{wanted}")
