"""Model checkpoints: CodeGPT's directory format, and import/export of nanoGPT and Hugging Face GPT-2.

A CodeGPT model directory holds `config.json` (format, model config, tokenizer, provenance) and
`model.safetensors` (the state dict; the head is tied to `transformer.wte.weight` and not stored
twice). Training runs add their own files to the same directory (see base/train.py). Directories
are written whole under a temporary name and renamed into place.

Foreign formats come in through `import_nanogpt` and `import_hf`, which return a config and a
state dict in our names; `load_any` picks the right one. Pickled `.pt` files are only ever read
with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from base.config import build, build_in_file
from base.errors import UserError
from base.fileio import atomic_directory, atomic_write_text, read_json, recover
from base.footprint import memory_problem
from base.model import GPT, GPTConfig
from base.tokenizer import ENCODING, EOT_ID

FORMAT = "codegpt"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TIED_KEY = "lm_head.weight"
# Linear layers that GPT-2's Conv1D stores as (in, out), transposed from nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def provenance(**extra) -> dict:
    """Where a model came from: time, git commit, library versions, plus `extra`."""
    info = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": code_commit(), "versions": library_versions()}
    info.update(extra)
    return info


def code_commit() -> str | None:
    """The commit of the repository that holds this code, or None when no repository tracks it:
    a copy of the code inside another project's working tree records nothing rather than that
    project's commit."""
    here = Path(__file__).resolve()
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", here.name], cwd=here.parent,
                                 capture_output=True, timeout=5).returncode == 0
        if not tracked:
            return None
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here.parent, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "tiktoken", "accelerate", "datasets", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: no tied duplicate, no wrapper prefixes, contiguous tensors."""
    state = strip_prefixes(model.state_dict())
    state.pop(TIED_KEY, None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (order independent).
    Adapters record it to refuse a base they were not trained on."""
    digest = hashlib.sha256()
    for key in sorted(state):
        if key == TIED_KEY:
            continue
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


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
    with atomic_directory(path) as tmp:
        write_model_files(tmp, model, tokenizer=tokenizer, meta=meta)
        if extra is not None:
            extra(tmp)
    return path


def read_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load the model.safetensors of a CodeGPT directory into `model` in place (exact keys)."""
    state = read_safetensors(Path(path) / WEIGHTS_FILE)
    state.setdefault(TIED_KEY, state.get("transformer.wte.weight"))
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
                        "convert it with `python -m base.convert`")
    return document


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a CodeGPT directory written by `save_model`."""
    path = Path(path)
    document = read_config(path)
    config = build_in_file(GPTConfig, document.get("model", {}), path / CONFIG_FILE, "model.")
    _check_fits(config, path / CONFIG_FILE)  # before reading weights that may be as large
    state = read_safetensors(path / WEIGHTS_FILE)
    return _instantiate(config, state, str(path), device, dtype)


def load_any(path: str | os.PathLike, device="cpu", dtype=None, **import_options) -> GPT:
    """Load our format, a nanoGPT / build-nanogpt `.pt`, or a Hugging Face GPT-2 directory."""
    kind = detect_format(path)
    if kind == FORMAT:
        return load_model(path, device, dtype)
    config, state = (import_nanogpt if kind == "nanogpt" else import_hf)(path, **import_options)
    return _instantiate(config, state, str(path), device, dtype)


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_dir():
        recover(path)
        config_path = path / CONFIG_FILE
        if config_path.is_file():
            document = read_json(config_path, f"{config_path}: vanished while reading")
            if document.get("format") == FORMAT:
                return FORMAT
            if document.get("model_type") == "gpt2" or "n_embd" in document:
                return "hf"
        raise UserError(f"{path}: neither a CodeGPT checkpoint nor a Hugging Face GPT-2 directory")
    if path.is_file():
        return "nanogpt"
    raise UserError(f"{path}: no such file or directory")


def _check_fits(config: GPTConfig, source) -> None:
    if (problem := memory_problem(config)) is not None:
        raise UserError(f"{source}: model.{problem[0]}: {problem[1]}")


def _instantiate(config: GPTConfig, state: dict, source: str, device, dtype) -> GPT:
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
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or damaged (truncated) one is a UserError."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: weights file missing") from None
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: unreadable safetensors file ({err})") from None


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


# --- nanoGPT / build-nanogpt ----------------------------------------------------------------------

class _PickledConfig:
    """Stand-in for the GPTConfig object build-nanogpt pickles into its checkpoints: it only
    receives attributes, so `weights_only` loading never runs code from the file."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


def _torch_load(path: Path):
    """torch.load with weights_only=True, where a pickled `*.GPTConfig` becomes `_PickledConfig`."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:
        raise UserError(f"{path}: not a PyTorch checkpoint ({err})") from None
    config_globals = [name for name in unsafe if name.rsplit(".", 1)[-1].endswith("Config")]
    others = sorted(set(unsafe) - set(config_globals))
    if others:
        raise UserError(f"{path}: refusing to unpickle {', '.join(others)} (only tensors, plain "
                        "containers and a GPTConfig are read from .pt files)")
    with torch.serialization.safe_globals([(_PickledConfig, name) for name in config_globals]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"{path}: cannot load ({err})") from None


def import_nanogpt(path: str | os.PathLike, n_head: int | None = None, activation: str | None = None,
                   **_) -> tuple[GPTConfig, dict]:
    """A nanoGPT (`model` + `model_args`) or build-nanogpt (`model` + `config`) checkpoint, or a
    bare state dict in their names. nanoGPT computes exact GELU, build-nanogpt the tanh form."""
    path = Path(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict, found {type(obj).__name__}")
    if "model" in obj:
        state, args = obj["model"], obj.get("model_args")
        if args is None and "config" in obj:
            args = dict(vars(obj["config"])) if isinstance(obj["config"], _PickledConfig) else obj["config"]
            default_activation = "gelu_tanh"
        else:
            default_activation = "gelu"
    else:
        state, args, default_activation = obj, None, "gelu"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: `model` is not a state dict of tensors")
    state = strip_prefixes(state)
    # Causal-mask buffers (nanoGPT without flash attention; HF's masked_bias) are not weights.
    state = {k: v for k, v in state.items() if not (k.endswith(".attn.bias") and v.dim() == 4)
             and not k.endswith(".attn.masked_bias")}
    args = dict(args or {})
    config = _config_from_state(state, path, n_head=n_head or args.get("n_head"),
                                dropout=float(args.get("dropout", 0.0)),
                                activation=activation or default_activation)
    for key in ("block_size", "vocab_size", "n_layer", "n_embd"):
        if key in args and args[key] != getattr(config, key):
            raise UserError(f"{path}: model_args.{key} = {args[key]} but the weights say {getattr(config, key)}")
    return config, state


def _config_from_state(state: dict, source, n_head, dropout: float, activation: str) -> GPTConfig:
    try:
        vocab_size, n_embd = state["transformer.wte.weight"].shape
        block_size = state["transformer.wpe.weight"].shape[0]
    except KeyError as err:
        raise UserError(f"{source}: no {err.args[0]} in the weights (not a GPT-2 layout)") from None
    n_layer = len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})
    if n_head is None:
        raise UserError(f"{source}: the file does not say n_head; pass --n-head")
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=int(n_head),
                       n_embd=n_embd, dropout=dropout, bias="transformer.ln_f.bias" in state,
                       activation=activation)
    return build(GPTConfig, dataclasses.asdict(config))


# --- Hugging Face GPT-2 ---------------------------------------------------------------------------

def import_hf(path: str | os.PathLike, **_) -> tuple[GPTConfig, dict]:
    """A `GPT2LMHeadModel` directory as `save_pretrained` writes it (config.json and
    model.safetensors or pytorch_model.bin)."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    hf = read_json(config_path, f"{path}: no {CONFIG_FILE} (not a Hugging Face model directory)")
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        if key not in hf:
            raise UserError(f"{config_path}: no {key} (not a GPT-2 config)")
    activation = HF_ACTIVATIONS.get(hf.get("activation_function", "gelu_new"))
    if activation is None:
        raise UserError(f"{config_path}: activation_function {hf['activation_function']!r} is not supported "
                        f"(supported: {', '.join(HF_ACTIVATIONS)})")
    for flag, wanted in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                         ("add_cross_attention", False)):
        if hf.get(flag, wanted) != wanted:
            raise UserError(f"{config_path}: {flag}={hf[flag]} computes a different function; not supported")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise UserError(f"{config_path}: layer_norm_epsilon={hf['layer_norm_epsilon']} (CodeGPT uses 1e-5)")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise UserError(f"{config_path}: n_inner={hf['n_inner']} (CodeGPT's MLP is 4 x n_embd)")
    if (path / "model.safetensors").is_file():
        raw = read_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        raw = _torch_load(path / "pytorch_model.bin")
    else:
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")
    state = {}
    for key, tensor in raw.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) and tensor.dim() != 1:
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        state[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=float(hf.get("resid_pdrop", 0.0)),
                       bias=True, activation=activation)
    return build(GPTConfig, dataclasses.asdict(config)), state


def export_hf(model: GPT, path: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face `GPT2LMHeadModel` directory (loads with `from_pretrained`)."""
    model = unwrap(model)
    config = model.config
    state = {}
    for key, tensor in model_state(model).items():
        if key == "active_ids":  # GPT-2 has no such buffer: the exported softmax covers every id
            continue
        state[key] = tensor.t().contiguous() if key.endswith(CONV1D_SUFFIXES) else tensor
    if not config.bias:
        # GPT-2 always has biases; zeros compute the same function as none.
        for key, tensor in model.state_dict().items():
            if key.endswith(".weight") and key != TIED_KEY and not key.endswith(("wte.weight", "wpe.weight")):
                out_features = tensor.shape[0]
                state.setdefault(key[: -len("weight")] + "bias", torch.zeros(out_features, dtype=tensor.dtype))
    eot = EOT_ID if EOT_ID < config.vocab_size else None
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_pytorch_tanh" if config.activation == "gelu_tanh" else "gelu",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
    }
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")
    return path
