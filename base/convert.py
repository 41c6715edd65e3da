"""Other checkpoint formats in and out: nanoGPT / build-nanogpt `.pt` files and Hugging Face
GPT-2 directories, read into our names (`load_any` takes any of them) and GPT-2 written back.

    codegpt convert ckpt.pt checkpoints/imported          # nanoGPT .pt -> CodeGPT
    codegpt convert hf-gpt2-dir checkpoints/imported      # HF GPT-2 directory -> CodeGPT
    codegpt convert checkpoints/run/final hf-out --to hf  # CodeGPT -> HF GPT-2, with its tokenizer
                                                          # (transformers, vLLM and pipelines load it)

Pickled `.pt` files are only ever read with `weights_only=True`: tensors, plain containers and a
pickled `GPTConfig` (build-nanogpt stores one) are accepted, anything else is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from codegpt.base.checkpoint import (CONFIG_FILE, FORMAT, load_model, model_from_state, model_state, read_safetensors,
                                     save_model)
from codegpt.base.errors import ArgumentParser, UserError, cli_entry, positive_int
from codegpt.base.fileio import atomic_directory, atomic_write_text, check_input_file, read_json, recover
from codegpt.base.generate import Sampling, banned_ids
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.outputs import check_output
from codegpt.base.provenance import TIED_KEY, provenance
from codegpt.base.recipe_loader import build
from codegpt.base.tokenizer import EOT_ID, Tokenizer
from codegpt.base.wrappers import strip_prefixes, unwrap

# Linear layers that GPT-2's Conv1D stores as (in, out), transposed from nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def load_any(path: str | os.PathLike, device="cpu", dtype=None, **import_options) -> GPT:
    """Load our format, a nanoGPT / build-nanogpt `.pt`, or a Hugging Face GPT-2 directory."""
    kind = detect_format(path)
    if kind == FORMAT:
        return load_model(path, device, dtype)
    config, state = (import_nanogpt if kind == "nanogpt" else import_hf)(path, **import_options)
    return model_from_state(config, state, str(path), device, dtype)


def detect_format(path: str | os.PathLike) -> str:
    check_input_file(path, "model")
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


GENERATION_CONFIG_FILE = "generation_config.json"
TRANSFORMERS_NEEDED = ("the Hugging Face export writes the tokenizer with transformers' converter: "
                       "pip install 'transformers>=4.46'")


def export_hf(model: GPT, path: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face `GPT2LMHeadModel` directory: config.json, model.safetensors,
    generation_config.json and, when the model's vocabulary holds our tokenizer's ids, the
    tokenizer (AutoTokenizer, pipeline("text-generation") and vLLM load the directory as it is).
    The tokenizer needs transformers, imported here only; without it nothing is written."""
    model = unwrap(model)
    config = model.config
    tokenizer = Tokenizer()
    hf_tokenizer = _hf_tokenizer_module() if writes_tokenizer(model, tokenizer) else None
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
        atomic_write_text(tmp / GENERATION_CONFIG_FILE,
                          json.dumps(hf_generation_config(model, tokenizer), indent=2) + "\n")
        if hf_tokenizer is not None:
            hf_tokenizer.write_hf_tokenizer(tmp, tokenizer.name, max_length=config.block_size)
    return path


def writes_tokenizer(model: GPT, tokenizer: Tokenizer) -> bool:
    """Whether the export carries our tokenizer: only a model whose embedding has a row for each
    of its ids (ours: 100,352 rows for 100,277 ids; an imported GPT-2 has another tokenizer)."""
    return model.config.vocab_size >= tokenizer.vocab_size


def _hf_tokenizer_module():
    try:
        from codegpt.base import hf_tokenizer
    except ImportError as err:
        raise UserError(f"{TRANSFORMERS_NEEDED} ({err})") from None
    return hf_tokenizer


def hf_generation_config(model: GPT, tokenizer: Tokenizer) -> dict:
    """generation_config.json: `codegpt sample`'s defaults (temperature, no top-k cut, 256 new
    tokens), <|endoftext|> to start and end, and the ids our sampler never draws as
    `suppress_tokens`: the padding rows and gaps no token decodes from, the fill-in-the-middle
    sentinels and, for a model trained over part of the vocabulary, the ids outside it. So
    transformers' greedy decoding picks our tokens."""
    document = {"do_sample": True, "temperature": Sampling.temperature, "top_k": 0,
                "max_new_tokens": Sampling.max_new_tokens}
    if EOT_ID < model.config.vocab_size:
        document.update(bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
    suppressed = banned_ids(model, tokenizer, "cpu").nonzero().flatten().tolist()
    if suppressed:
        document["suppress_tokens"] = suppressed
    return document


def hf_export_notes(model: GPT) -> list[str]:
    """What the user should know about the export of `model`, one line each."""
    notes = []
    tokenizer = Tokenizer()
    if not writes_tokenizer(model, tokenizer):
        notes.append(f"no tokenizer written: the model has {model.config.vocab_size:,} ids, fewer than "
                     f"{tokenizer.name}'s {tokenizer.vocab_size:,}")
    if model.config.active_vocab is not None:
        outside = model.config.vocab_size - model.config.active_vocab
        notes.append(f"the model was trained over {model.config.active_vocab:,} of its {model.config.vocab_size:,} ids; "
                     f"GPT-2 has no such restriction, so the exported logits cover the other {outside:,} too: "
                     f"generation_config.json suppresses them in transformers' generate (vLLM takes only its "
                     f"sampling defaults from that file)")
    return notes


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="CodeGPT directory, nanoGPT .pt file, or Hugging Face GPT-2 directory")
    parser.add_argument("dest", help="output directory")
    parser.add_argument("--to", choices=("codegpt", "hf"), default="codegpt")
    parser.add_argument("--overwrite", action="store_true", help="replace DEST if it is a model directory")
    parser.add_argument("--n-head", type=positive_int, help="heads, for a .pt file whose config does not say")
    parser.add_argument("--activation", choices=("gelu_tanh", "gelu"),
                        help="override the GELU form read from a .pt file (nanoGPT: gelu, build-nanogpt: gelu_tanh)")
    args = parser.parse_args(argv)
    check_output(args.dest, command="codegpt convert", inputs={"source": args.source}, overwrite=args.overwrite,
                 key="DEST")
    kind = detect_format(args.source)
    model = load_any(args.source, n_head=args.n_head, activation=args.activation)
    if args.to == "hf":
        export_hf(model, args.dest)
        for note in hf_export_notes(model):
            print(f"note: {args.source}: {note}")
    else:
        save_model(args.dest, model, meta=provenance(source=str(args.source), source_format=kind))
    print(f"{args.source} ({kind}) -> {args.dest} ({args.to}): {model.num_params():,} parameters")


if __name__ == "__main__":
    main()
