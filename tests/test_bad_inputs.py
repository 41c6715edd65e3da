"""Bad input to every command and to the HTTP API, swept.

Each command gets one line on stderr naming the file, key or field, exit code 2, no traceback,
and leaves every file it could see as it was: the sweep runs in a directory holding a small
model, an adapter, token shards, task examples and recipes, and hashes all of it before and
after each case. The API answers 4xx with a JSON error naming the field. Commands run in this
process (their `main(argv)`), which costs milliseconds where a fresh interpreter costs seconds.
"""

import hashlib
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from codegpt.base.checkpoint import save_model

from codegpt.base.provenance import weights_hash
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.recipe import DataConfig
from codegpt.base.data.shards import build_shards
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import write_adapter_files
from codegpt.finetune.lora import LoRAConfig, apply_lora

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = "model:\n  block_size: 32\n  n_layer: 1\n  n_head: 2\n  n_embd: 32\n  dropout: 0.0\n"


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A working directory with one of everything the commands read, good and bad."""
    w = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    model = GPT(config)
    save_model(w / "run/final", model)
    base_hash = weights_hash(model.state_dict())
    lora = LoRAConfig(r=2, targets=["c_attn"])
    apply_lora(model, lora)
    for name in ("adapter", "adapter-truncated", "adapter-list", "adapter-otherbase", "adapter-nohash"):
        (w / name).mkdir()
        write_adapter_files(w / name, model, lora, str(w / "run/final"), base_hash)
    weights = (w / "adapter-truncated/adapter.safetensors").read_bytes()
    _write(w / "adapter-truncated/adapter.safetensors", weights[: len(weights) // 2])
    _write(w / "adapter-list/adapter.json", "[]\n")
    document = json.loads((w / "adapter/adapter.json").read_text())
    _write(w / "adapter-otherbase/adapter.json", json.dumps({**document, "base_hash": "0" * 64}))
    _write(w / "adapter-nohash/adapter.json", json.dumps({k: v for k, v in document.items() if k != "base_hash"}))

    # Checkpoints whose config.json or weights are broken, each beside good weights.
    good_config = json.loads((w / "run/final/config.json").read_text())
    for name, content in (("ckpt-list", "[]"), ("ckpt-binary", b"\xff\xfe{}"),
                          ("ckpt-huge", json.dumps({**good_config, "model": {**good_config["model"], "n_layer": 10**6}})),
                          ("ckpt-badtype", json.dumps({**good_config, "model": {**good_config["model"], "n_layer": "two"}})),
                          ("ckpt-truncated", json.dumps(good_config))):
        _write(w / name / "config.json", content)
        weights = (w / "run/final/model.safetensors").read_bytes()
        _write(w / name / "model.safetensors", weights[:1000] if name == "ckpt-truncated" else weights)
    _write(w / "not-gpt2/config.json", json.dumps({"model_type": "bert"}))
    _write(w / "gpt2-incomplete/config.json", json.dumps({"model_type": "gpt2", "n_embd": 32}))
    _write(w / "garbage.pt", b"not a pickle at all")

    # Token shards from a few standard-library files, and shard directories that are not.
    corpus = Path(sysconfig.get_paths()["stdlib"]) / "json"
    data = DataConfig(source="local", paths=[str(corpus)], shard_dir=str(w / "shards"), val_fraction=0.3, num_workers=1)
    build_shards(data, Tokenizer(), w / "shards")
    _write(w / "shards-garbage/index.json", "{not json")
    _write(w / "a-file", "not a directory\n")

    # Recipes.
    data_section = (f"data:\n  source: local\n  paths: [{corpus}]\n  shard_dir: {w / 'shards'}\n"
                    "  val_fraction: 0.3\n  num_workers: 1\n")
    train = "train:\n  batch_tokens: 128\n  micro_batch_size: 4\n  max_steps: 2\n  warmup_steps: 1\n"
    _write(w / "recipes/tiny.yaml", f"out_dir: {w / 'run'}\n{TINY_MODEL}{data_section}{train}"
                                    "log:\n  wandb: disabled\n  quality_samples: 0\n")
    _write(w / "recipes/sft.yaml", f"out_dir: {w / 'sft'}\nbase: {w / 'run/final'}\nblock_size: 32\n"
                                   f"task:\n  data_dir: {w / 'tasks'}\n  paths: [{corpus}]\n{train}")
    _write(w / "recipes/task.yaml", f"task:\n  name: docstring\n  paths: [{corpus}]\n  data_dir: {w / 'tasks'}\n")
    _write(w / "recipes/binary.yaml", b"train:\n  lr: \xff\xfe\n")
    _write(w / "recipes/twice.yaml", "train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    _write(w / "recipes/task-twice.yaml", "task:\n  name: docstring\ntask:\n  name: bugfix\n")
    _write(w / "recipes/empty.yaml", "# nothing set\n")
    _write(w / "recipes/broken.yaml", "train:\n  lr: [1,\n")

    # Prompts and task examples.
    _write(w / "prompt.bin", b"\x89PNG\r\n\x1a\n\x00\xff")
    example = {"task": "docstring", "prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n", "completion": "    return 2 * x\n"}
    _write(w / "examples/unknown-task.jsonl", json.dumps(example) + "\n" + json.dumps({**example, "task": "poetry"}) + "\n")
    _write(w / "examples/mixed.jsonl", json.dumps(example) + "\n" + json.dumps({**example, "task": "bugfix"}) + "\n")
    _write(w / "examples/garbage.jsonl", "{\"prompt\": \n")
    _write(w / "examples/empty.jsonl", "\n")

    # Hostile inputs: a FIFO (reading one blocks forever), the user's own corpus beside where task
    # examples could go, a corpus whose rows lack `content`, and weights of the wrong kind.
    os.mkfifo(w / "fifo")
    _write(w / "corpus/train.jsonl", json.dumps({"content": "def double(x):\n    \"\"\"Double x.\"\"\"\n    return 2 * x\n"})
           + "\n")
    _write(w / "corpus-norows/docs.jsonl", json.dumps({"text": "no content field"}) + "\n")
    _write(w / "ckpt-fifo/config.json", json.dumps(good_config))
    os.mkfifo(w / "ckpt-fifo/model.safetensors")
    state = load_file(w / "run/final/model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].to(torch.int32)
    (w / "ckpt-int32").mkdir()
    save_file(state, w / "ckpt-int32/model.safetensors")
    _write(w / "ckpt-int32/config.json", json.dumps(good_config))
    torch.save({"model": state, "model_args": {"n_head": 2}}, w / "int32.pt")
    shutil.copytree(w / "adapter", w / "adapter-int32")
    lora_state = load_file(w / "adapter/adapter.safetensors")
    save_file({k: v.to(torch.int32) for k, v in lora_state.items()}, w / "adapter-int32/adapter.safetensors")
    return w


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash), directory and link under `root`."""
    state = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                state[key] = "dir"
            elif not path.is_file():  # a FIFO: reading it would block
                state[key] = "special"
            else:
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


# (command, arguments with {w} for the world directory, what the one line must name)
CASES = [
    # Recipes
    ("codegpt.base.data.build", ["{w}/recipes/binary.yaml"], "binary.yaml: not a text recipe"),
    ("codegpt.base.data.build", ["{w}/recipes/twice.yaml"], "twice.yaml:3: train.lr: given twice (lines 2 and 3)"),
    ("codegpt.base.data.build", ["{w}/recipes/empty.yaml"], "empty.yaml: recipe is empty"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "data.shard_dir={w}/a-file"], "a-file"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "data.shard_dir={w}/shards-garbage"], "shards-garbage: holds index.json"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "data.val_fraction=2"], "data.val_fraction"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "data.paths=[{w}/nowhere]"], "data.paths"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "--shards"], "unexpected argument '--shards'"),
    ("codegpt.base.pretrain", ["{w}/recipes/empty.yaml"], "recipe is empty"),
    ("codegpt.base.pretrain", ["{w}/recipes/binary.yaml"], "binary.yaml"),
    ("codegpt.base.pretrain", ["{w}/recipes/twice.yaml"], "train.lr: given twice"),
    ("codegpt.base.pretrain", ["{w}/recipes/tiny.yaml", "bad.key=1"], "bad.key: unknown key"),
    ("codegpt.base.pretrain", ["{w}/recipes/tiny.yaml", "model.n_layer=1000000"], "model.n_layer: 1,000,000 makes"),
    ("codegpt.base.pretrain", ["{w}/recipes/tiny.yaml", "model.vocab_size=1000000000000"], "model.vocab_size"),
    ("codegpt.base.pretrain", ["{w}/recipes/tiny.yaml", "train.lr=-1"], "train.lr"),
    ("codegpt.base.pretrain", ["{w}/recipes/tiny.yaml", "train.batch_tokens=100"], "train.batch_tokens"),
    ("codegpt.base.pretrain", ["{w}/recipes/tiny.yaml", "model.n_head=3"], "model.n_embd"),
    ("codegpt.base.pretrain", ["{w}/recipes/missing.yaml"], "missing.yaml: recipe file not found"),
    ("codegpt.base.pretrain", ["{w}/recipes/broken.yaml"], "broken.yaml:3: invalid YAML"),
    ("codegpt.base.pretrain", ["{w}/recipes/tiny.yaml", "train.lr"], "unexpected argument 'train.lr'"),
    ("codegpt.base.pretrain", ["{w}/recipes/tiny.yaml", "=1"], "expected section.key=value"),
    ("codegpt.finetune.sft", [], "name a recipe"),
    ("codegpt.finetune.sft", ["{w}/recipes/empty.yaml"], "recipe is empty"),
    ("codegpt.finetune.sft", ["{w}/recipes/binary.yaml"], "binary.yaml"),
    ("codegpt.finetune.sft", ["{w}/recipes/sft.yaml", "base={w}/nowhere"], "base: {w}/nowhere not found"),
    ("codegpt.finetune.sft", ["{w}/recipes/sft.yaml", "lora.r=0"], "lora.r"),
    ("codegpt.finetune.sft", ["{w}/recipes/sft.yaml", "method=half"], "method"),
    ("codegpt.finetune.sft", ["{w}/recipes/sft.yaml", "train.max_steps=0"], "train.max_steps"),
    ("codegpt.tasks.build", ["{w}/recipes/empty.yaml"], "recipe is empty"),
    ("codegpt.tasks.build", ["{w}/recipes/task-twice.yaml"], "task-twice.yaml:3: task: given twice"),
    ("codegpt.tasks.build", ["{w}/recipes/binary.yaml"], "binary.yaml"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.name=poetry"], "task.name"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.paths=[{w}/nowhere]"], "task.paths"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.source=files", "task.paths=[]"], "task.paths"),
    # Models, adapters, checkpoints
    ("codegpt.finetune.sample", ["{w}/ckpt-list"], "ckpt-list/config.json: expected a JSON object"),
    ("codegpt.finetune.sample", ["{w}/ckpt-binary"], "ckpt-binary/config.json: not a JSON text file"),
    ("codegpt.finetune.sample", ["{w}/ckpt-huge"], "ckpt-huge/config.json: model.n_layer: 1,000,000 makes"),
    ("codegpt.finetune.sample", ["{w}/ckpt-badtype"], "ckpt-badtype/config.json: model.n_layer: expected int"),
    ("codegpt.finetune.sample", ["{w}/ckpt-truncated"], "ckpt-truncated/model.safetensors"),
    ("codegpt.finetune.sample", ["{w}/nowhere"], "nowhere"),
    ("codegpt.finetune.merge", ["{w}/adapter-truncated", "{w}/merged"], "adapter-truncated/adapter.safetensors"),
    ("codegpt.finetune.merge", ["{w}/adapter-list", "{w}/merged"], "adapter-list/adapter.json"),
    ("codegpt.finetune.merge", ["{w}/adapter-nohash", "{w}/merged"], "adapter-nohash/adapter.json: base_hash"),
    ("codegpt.finetune.merge", ["{w}/adapter", "{w}/run/final"], "is the base model"),
    ("codegpt.finetune.merge", ["{w}/adapter", "{w}/recipes"], "recipes: not empty"),
    ("codegpt.finetune.merge", ["{w}/adapter"], "out"),
    ("codegpt.finetune.sample", ["{w}/adapter-otherbase"], "adapter-otherbase: this adapter was trained on another base"),
    ("codegpt.finetune.sample", ["{w}/adapter-truncated"], "adapter-truncated/adapter.safetensors"),
    ("codegpt.base.convert", ["{w}/garbage.pt", "{w}/out"], "garbage.pt"),
    ("codegpt.base.convert", ["{w}/run/final", "{w}/out", "--to", "onnx"], "--to"),
    ("codegpt.base.convert", ["{w}/nowhere", "{w}/out"], "nowhere"),
    ("codegpt.base.convert", ["{w}/not-gpt2", "{w}/out"], "not-gpt2: neither a CodeGPT checkpoint"),
    ("codegpt.base.convert", ["{w}/garbage.pt", "{w}/out", "--n-head", "0"], "--n-head"),
    ("codegpt.base.convert", ["{w}/gpt2-incomplete", "{w}/out"], "gpt2-incomplete/config.json: no n_positions"),
    ("codegpt.base.convert", ["{w}/ckpt-list", "{w}/out"], "ckpt-list/config.json: expected a JSON object, got list"),
    ("codegpt.finetune.quality_report", ["{w}/run/final", "-k", "0"], "-k/--samples"),
    ("codegpt.finetune.quality_report", ["{w}/run/final", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("codegpt.finetune.quality_report", ["{w}/ckpt-list"], "ckpt-list/config.json"),
    ("codegpt.finetune.quality_report", ["{w}/run/final", "-k", "1", "--max-new-tokens", "1", "--shards", "{w}/shards-garbage"],
     "shards-garbage: no token shards"),
    ("codegpt.serve.__main__", ["{w}/run/final", "--port", "70000"], "--port"),
    ("codegpt.serve.__main__", ["{w}/run/final", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("codegpt.serve.__main__", ["{w}/run/final", "--slots", "0"], "--slots"),
    ("codegpt.serve.__main__", ["{w}/nowhere"], "nowhere"),
    ("codegpt.serve.__main__", [], "model"),
    ("codegpt.serve.__main__", ["{w}/adapter-list"], "adapter-list/adapter.json"),
    ("codegpt.serve.__main__", ["{w}/run/final", "--adapter", "{w}/adapter-list"], "adapter-list/adapter.json"),
    ("codegpt.serve.__main__", ["{w}/run/final", "--adapter", "x={w}/adapter", "--adapter", "x={w}/adapter"],
     "two models are named 'x'"),
    # Sampling options and prompts
    ("codegpt.finetune.sample", ["{w}/run/final", "--temperature", "1e-40"], "--temperature"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--temperature", "nan"], "--temperature"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--temperature", "hot"], "--temperature"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--seed", str(2**70)], "--seed"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--seed", "-1"], "--seed"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--file", "{w}/prompt.bin"], "prompt.bin: the prompt file is not UTF-8"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--file", "{w}/nowhere.py"], "nowhere.py"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--num-samples", "0"], "--num-samples"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--top-p", "1.5"], "--top-p"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--top-k", "0"], "--top-k"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--stop", ""], "--stop"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--bogus"], "--bogus"),
    ("codegpt.finetune.sample", ["{w}/run/final", "-n", "0"], "-n/--num-samples"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--task-examples", "{w}/examples/unknown-task.jsonl"],
     "unknown-task.jsonl:2: unknown task 'poetry'"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--task-examples", "{w}/examples/garbage.jsonl"], "garbage.jsonl:1"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--seed", str(2**70)], "--seed"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--file", "{w}/prompt.bin"], "prompt.bin"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--limit", "0"], "--limit"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--batch-size", "0"], "--batch-size"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "-n", "0"], "-n/--samples"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--benchmark", "examples", "--examples", "{w}/examples/unknown-task.jsonl"],
     "unknown-task.jsonl:2: unknown task 'poetry'"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--benchmark", "examples", "--examples", "{w}/examples/mixed.jsonl"],
     "mixed.jsonl: record 2"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--benchmark", "examples", "--examples", "{w}/examples/empty.jsonl"],
     "empty.jsonl: no examples"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--benchmark", "examples"], "--examples"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--benchmark", "mbpp"], "--benchmark"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--temperature", "1e-40"], "--temperature"),
    # Outputs in impossible places or over what the command did not make (issue 22), each refused
    # before any work: an input of the command, or a directory holding one, or inside one.
    ("codegpt.tasks.build", ["{root}/recipes/docstring-tiny.yaml", "task.source=files", "task.paths=[{w}/corpus/train.jsonl]",
                             "task.data_dir={w}/corpus"], "corpus: holds {w}/corpus/train.jsonl, the corpus (task.paths)"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.data_dir={w}/a-file"], "a-file: exists and is not a directory"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.data_dir={w}/a-file/tasks"], "a-file is a file, not a directory"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.data_dir={w}/recipes"],
     "recipes: holds binary.yaml, which codegpt tasks did not make"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.data_dir={w}/examples"], "examples: holds empty.jsonl"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.data_dir=/proc/codegpt-tasks"], "cannot write in /proc"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "data.shard_dir=/proc/codegpt-shards"], "cannot write in /proc"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "data.source=files", "data.paths=[{w}/corpus/train.jsonl]",
                                 "data.shard_dir={w}/corpus"], "corpus: holds {w}/corpus/train.jsonl, the corpus (data.paths)"),
    ("codegpt.finetune.merge", ["{w}/adapter", "/proc/merged"], "/proc/merged: cannot write in /proc"),
    ("codegpt.finetune.merge", ["{w}/adapter", "{w}/a-file/merged"], "a-file is a file, not a directory"),
    ("codegpt.finetune.merge", ["{w}/adapter", "{w}/adapter/merged"], "adapter/merged: inside {w}/adapter, the adapter"),
    ("codegpt.finetune.merge", ["{w}/adapter", "{w}"], "holds {w}/run/final, the base model"),
    ("codegpt.base.convert", ["{w}/run/final", "/proc/x"], "/proc/x: cannot write in /proc"),
    ("codegpt.base.convert", ["{w}/run/final", "{w}/a-file/out"], "a-file is a file, not a directory"),
    ("codegpt.base.convert", ["{w}/run/final", "{w}/a-file"], "a-file: exists and is not a directory"),
    ("codegpt.base.convert", ["{w}/run/final", "{w}/run", "--overwrite"], "run: holds {w}/run/final, the source"),
    ("codegpt.base.convert", ["{w}/garbage.pt", "{w}/garbage.pt"], "garbage.pt: is the source"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--out", "/proc/x.json", "--limit", "1", "--max-new-tokens", "1"], "/proc/x.json: cannot write in /proc"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--out", "{w}/recipes", "--limit", "1", "--max-new-tokens", "1"],
     "recipes: is a directory; a file is written here (--out)"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--out", "{w}/recipes/tiny.yaml", "--limit", "1", "--max-new-tokens", "1"],
     "tiny.yaml: exists and is not a results file of codegpt evaluate"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--benchmark", "examples", "--examples", "{w}/corpus/train.jsonl",
                                   "--out", "{w}/corpus/train.jsonl"], "train.jsonl: is the examples"),
    ("codegpt.finetune.evaluate", ["{w}/garbage.pt", "--out", "{w}/garbage.pt"], "garbage.pt: is the model"),
    ("codegpt.finetune.quality_report", ["{w}/run/final", "-k", "1", "--json", "{w}/recipes/tiny.yaml"],
     "tiny.yaml: exists and is not a report of codegpt quality; name a new file (--json)"),
    ("codegpt.finetune.quality_report", ["{w}/run/final", "-k", "1", "--json", "/proc/q.json"], "cannot write in /proc"),
    ("codegpt.finetune.quality_report", ["{w}/run/final", "-k", "1", "--json", "{w}/run/final"],
     "final: is the model"),
    # Devices, FIFOs and sockets as input files: refused naming them before they are read.
    ("codegpt.finetune.sample", ["{w}/run/final", "--file", "/dev/zero"], "/dev/zero: is a character device"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--file", "{w}/fifo"], "fifo: is a FIFO, not a regular file (--file)"),
    ("codegpt.finetune.sample", ["{w}/run/final", "--task-examples", "{w}/fifo"], "fifo: is a FIFO"),
    ("codegpt.finetune.sample", ["{w}/fifo"], "fifo: is a FIFO, not a regular file (model)"),
    ("codegpt.finetune.sample", ["{w}/ckpt-fifo"], "ckpt-fifo/model.safetensors: is a FIFO"),
    ("codegpt.finetune.evaluate", ["{w}/run/final", "--benchmark", "examples", "--examples", "/dev/zero"],
     "/dev/zero: is a character device"),
    ("codegpt.base.data.build", ["{w}/fifo"], "fifo: is a FIFO, not a regular file (recipe)"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "data.paths=[/dev/zero]", "data.shard_dir={w}/new-shards"],
     "data.paths: /dev/zero is a character device"),
    ("codegpt.base.data.build", ["{w}/recipes/tiny.yaml", "data.source=files", "data.paths=[{w}/fifo]",
                                 "data.shard_dir={w}/new-shards"], "data.paths: {w}/fifo is a FIFO"),
    ("codegpt.tasks.build", ["{w}/recipes/task.yaml", "task.paths=[/dev/zero]", "task.data_dir={w}/new-tasks"],
     "task.paths: /dev/zero is a character device"),
    ("codegpt.finetune.sft", ["{w}/fifo"], "fifo: is a FIFO"),
    # Weights of the wrong kind: named with their dtype.
    ("codegpt.finetune.sample", ["{w}/ckpt-int32"], "ckpt-int32: transformer.h.0.attn.c_attn.weight is int32"),
    ("codegpt.finetune.sample", ["{w}/adapter-int32"], "adapter-int32/adapter.safetensors: transformer.h.0.attn.c_attn.lora_A is int32"),
    ("codegpt.finetune.merge", ["{w}/adapter-int32", "{w}/merged"], "lora_A is int32"),
    ("codegpt.base.convert", ["{w}/int32.pt", "{w}/out"], "int32.pt: transformer.h.0.attn.c_attn.weight is int32"),
]


@pytest.mark.parametrize("command,args,names", CASES, ids=[f"{c}:{' '.join(a)[-60:]}" for c, a, _ in CASES])
def test_a_command_refuses_bad_input_in_one_line_and_changes_nothing(world, command, args, names, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(world)  # whatever a command would write by default lands where it is hashed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_refused(world, command, args, names, capsys)


def assert_refused(world: Path, command: str, args: list[str], names: str, capsys) -> str:
    """Run `command` on `args`: one line on stderr naming `names`, exit 2, the world unchanged."""
    main = importlib.import_module(command).main
    before = snapshot(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{w}", str(world)).replace("{root}", str(ROOT)) for a in args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert names.replace("{w}", str(world)) in err, err
    assert snapshot(world) == before
    return err


# The API: (request body, or raw bytes, the field the JSON error must name)
API_CASES = [
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "seed": 2**70, "stream": True}, "seed"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "temperature": 1e-40}, "temperature"),
    ({"prompt": "x", "temperature": 1e-40, "stream": True}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": 11}, "temperature"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**6}, "max_new_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": 0}, "top_k"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": "\n"}, "stop"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "stream": "maybe"}, "stream"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "word " * 800}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "temprature": 0.5}, "temprature"),
    (b'{"prompt": "x",', None),
    (b"[]", None),
]


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    from codegpt.serve.app import Limits, create_app

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)).eval()
    info = {"model": "tiny", "parameters": model.num_params(), "adapter": None, "device": "cpu"}
    with TestClient(create_app(model, Tokenizer(), info, Limits(max_prompt_tokens=63))) as c:
        yield c


@pytest.mark.parametrize("body,field", API_CASES, ids=[str(b)[:50] for b, _ in API_CASES])
def test_the_api_refuses_bad_input_naming_the_field(client, body, field):
    if isinstance(body, bytes):
        response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/generate", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["field"] == field and isinstance(error["error"], str), error
    if field is not None:
        assert error["error"].startswith(f"{field}: ")


def test_the_readmes_accelerate_example_prints_our_line_alone():
    """The README's example, run as written: accelerate adds no line of its own, and exits 1
    (its launcher turns any failure of the script into 1, as the README says)."""
    example = re.search(r"\n\$ (accelerate launch (?:[^\n]*\\\n)*[^\n]*)\n(error: [^\n]+)\n",
                        (ROOT / "README.md").read_text())
    command, expected = example.group(1).replace("\\\n", " "), example.group(2)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    result = subprocess.run([accelerate, *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.stderr == expected + "\n" and result.returncode == 1, result.stderr


def _fills_the_disk(written: bytes):
    """A stand-in for safetensors' save_file on a full disk: part of the file lands, then the
    error safetensors raises (its Rust I/O error quotes the errno)."""
    from safetensors import SafetensorError

    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(written)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_file


@pytest.mark.parametrize("command,args", [
    ("codegpt.finetune.merge", ["{w}/adapter", "{w}/disk-full/merged", "--overwrite"]),
    ("codegpt.base.convert", ["{w}/run/final", "{w}/disk-full/converted", "--overwrite"]),
    ("codegpt.base.convert", ["{w}/run/final", "{w}/disk-full/hf", "--to", "hf", "--overwrite"]),
])
def test_a_full_disk_is_one_line_naming_the_path_and_the_previous_model_stays(world, command, args, capsys,
                                                                               monkeypatch):
    """The disk fills while the weights are written: one line with the path and the bytes needed,
    exit 2, the temporaries gone and the model written before (by the same command) untouched."""
    monkeypatch.chdir(world)
    argv = [a.replace("{w}", str(world)) for a in args]
    importlib.import_module(command).main(argv)  # the previous model, written while there was room
    monkeypatch.setattr("codegpt.base.checkpoint.save_file", _fills_the_disk(b"\0" * 1000))
    monkeypatch.setattr("codegpt.base.convert.save_file", _fills_the_disk(b"\0" * 1000))
    err = assert_refused(world, command, args, f"{argv[1]}: no space left on the device (needs ", capsys)
    assert re.search(r"needs (more than )?[\d,]+ bytes, [\d,]+ free\)", err), err


def test_a_full_disk_while_writing_task_examples_keeps_the_earlier_ones(world, capsys, monkeypatch):
    """Through base/fileio.py's atomic file writes (task examples, results, a run's files): the
    OSError of a full disk (here from fsync, where a delayed allocation reports it) is one line."""
    import errno

    monkeypatch.chdir(world)
    args = ["{w}/recipes/task.yaml", "task.data_dir={w}/disk-full/tasks", "task.max_examples=20"]
    importlib.import_module("codegpt.tasks.build").main([a.replace("{w}", str(world)) for a in args])

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    assert_refused(world, "codegpt.tasks.build", args, "disk-full/tasks/summary.json: no space left on the device "
                   "(needs ", capsys)


def test_a_failed_shard_build_leaves_no_directory(world, capsys, monkeypatch):
    """A new shard directory whose build fails before its first shard (a corpus row without
    content) is removed; the bar's lines aside, the error is the command's last line."""
    monkeypatch.chdir(world)
    before = snapshot(world)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module("codegpt.base.data.build").main(
            [f"{world}/recipes/tiny.yaml", "data.source=files", f"data.paths=[{world}/corpus-norows/docs.jsonl]",
             f"data.shard_dir={world}/new-shards"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.endswith(f"error: {world}/corpus-norows/docs.jsonl: row 1 has no `content` field\n"), err
    assert snapshot(world) == before


# Run under `unshare -m` as root: a 20 MB tmpfs of its own holds one merged model (13 MB) but not a
# second one beside it, so the second merge meets a real full disk (safetensors' own error).
ON_A_SMALL_DISK = """
import hashlib, json, os, subprocess, sys
disk, adapter = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", disk], check=True)
merge = [sys.executable, "-m", "codegpt.finetune.merge", adapter, disk + "/merged"]
def files():
    return {name: hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for root, _, names in os.walk(disk) for name in names}
first = subprocess.run(merge, capture_output=True, text=True)
before = files()
second = subprocess.run(merge + ["--overwrite"], capture_output=True, text=True)
print(json.dumps({"first": first.returncode, "second": second.returncode, "stderr": second.stderr,
                  "before": before, "after": files(), "entries": os.listdir(disk)}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root to mount a tmpfs")
def test_a_merge_onto_a_really_full_disk_keeps_the_previous_model(world, tmp_path):
    result = subprocess.run(["unshare", "-m", sys.executable, "-c", ON_A_SMALL_DISK, str(tmp_path), str(world / "adapter")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    report = json.loads(result.stdout)
    assert report["first"] == 0 and report["second"] == 2, report["stderr"]
    assert re.fullmatch(rf"error: {tmp_path}/merged: no space left on the device \(needs [\d,]+ bytes, [\d,]+ free\); "
                        r"nothing was replaced\n", report["stderr"]), report["stderr"]
    assert report["after"] == report["before"] and set(report["before"]) == {"config.json", "model.safetensors"}
    assert report["entries"] == ["merged"]  # no temporary left beside it
