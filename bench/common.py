"""What the benchmarks share: FLOP counts, a matmul peak to compute MFU against, peak memory,
timing, the peers built with our architecture (transformers' GPT-2, nanoGPT's model.py), and the
pretraining command run on local data as a user runs it."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from codegpt.base.errors import UserError
from codegpt.base.model import GPTConfig

ROOT = Path(__file__).resolve().parent.parent
SEED = dataclasses.replace(GPTConfig(), dropout=0.0)  # the seed's model, as the GPU figures measure it
SMOKE = GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64, dropout=0.0)  # the same code at CPU size


def flops_per_token(config: GPTConfig) -> float:
    """Model FLOPs of one trained token: 6 x the matmul parameters (the tied head included) plus
    12 x n_layer x n_embd x block_size for attention's scores and values, forward and backward."""
    matmul_params = config.n_layer * 12 * config.n_embd**2 + config.n_embd * config.vocab_size
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * config.block_size


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it: every CPU figure names its machine."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device="cpu", dtype=torch.float32, sizes=(1024, 2048, 4096), repeats: int = 5) -> float:
    """The best FLOP/s of square matmuls over a few sizes, each the best of `repeats` timed runs:
    one size or one run can land on a slow moment (another process, a frequency change) and would
    make every MFU figure computed against it too high."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b
        runs = max(1, min(10, int(2e10 // (2 * size**3))))  # ~ a tenth of a second at 200 GFLOP/s
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(runs):
                a @ b
            sync(device)
            best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
    return best


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss over from the parent across fork and exec, so a worker started by a big parent
    would report the parent's peak."""
    return _status_mib("VmHWM")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(times: list[float], work: float) -> dict:
    """Median rate and its spread (max - min) of `work` done in each of `times`."""
    rates = [work / t for t in times]
    return {"median": statistics.median(rates), "spread": max(rates) - min(rates)}


def hf_gpt2(config: GPTConfig):
    """transformers' GPT-2 with our architecture, built directly (no second model in memory)."""
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, activation_function="gelu_pytorch_tanh", resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout, attn_implementation="sdpa"))


def nanogpt_module(path: str):
    """nanoGPT's model.py, imported from the file the user names (it is not ours to vendor)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt(module, config: GPTConfig):
    """nanoGPT's GPT with our architecture (nanoGPT's model.py always uses exact GELU)."""
    return module.GPT(module.GPTConfig(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                       block_size=config.block_size, vocab_size=config.vocab_size,
                                       dropout=config.dropout, bias=config.bias))


def fresh(work: Path, name: str) -> Path:
    """A path in `work` that nothing holds yet, for a command that writes there."""
    return Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-")) / name


def validation_windows(shard_dir: Path, block_size: int) -> int:
    """The validation rows (windows of block_size + 1 tokens) a pretraining run finds in `shard_dir`."""
    from codegpt.base.data.loader import BatchLoader

    try:
        return BatchLoader(str(shard_dir), "val", block_size, 1).num_windows
    except UserError:  # no window at all
        return 0


class LocalShards(NamedTuple):
    overrides: list[str]  # the `data.*` settings that built them: the command given them finds them built
    shard_dir: Path
    val_fraction: float
    val_rows: int


def local_shards(recipe: str, work: Path, eval_tokens: int, max_tokens: int | None = None,
                 fraction: float = 0.05) -> LocalShards:
    """Token shards of this Python's standard library (data.source=local; at most `max_tokens`)
    for `recipe`, whose validation split holds every batch an evaluation of `eval_tokens` tokens
    takes.

    Documents go to validation by a hash of their content, so the rows a fraction gives depend on
    the standard library at hand: the 70M recipe's 0.005 gave one machine 25 rows of 1,024 tokens,
    where one batch takes 16. A fraction that falls short is raised in proportion, up to a half,
    and the shards built again beside the first."""
    from codegpt.base.recipe import PretrainRecipe
    from codegpt.base.recipe_loader import load_recipe

    settings = load_recipe(PretrainRecipe, ROOT / recipe)
    block_size, batch = settings.model.block_size, settings.train.micro_batch_size
    rows_needed = max(1, eval_tokens // (batch * block_size)) * batch
    for attempt in range(4):
        shard_dir = work / f"shards-{attempt}"
        data = ["data.source=local", f"data.shard_dir={shard_dir}", f"data.val_fraction={fraction:.6g}",
                *([f"data.max_tokens={max_tokens}"] if max_tokens else [])]
        built = subprocess.run([sys.executable, "-m", "codegpt.base.data", recipe, *data], cwd=ROOT,
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building the shards failed: {(built.stdout + built.stderr).strip()[-500:]}")
        rows = validation_windows(shard_dir, block_size)
        if rows >= rows_needed or fraction >= 0.5:
            break
        fraction = min(0.5, fraction * 2 * rows_needed / max(rows, 1))
    if rows < rows_needed:
        raise RuntimeError(f"the standard library gives {rows} validation rows of {block_size} tokens at "
                           f"val_fraction {fraction:g}; {rows_needed} needed")
    return LocalShards(data, shard_dir, fraction, rows)


def pretrain_command(recipe: str, data: list[str], out_dir: Path, steps: int, eval_tokens: int) -> list[str]:
    """`accelerate launch base/pretrain.py` as a user runs it (the recipe's precision and compile,
    the closing quality samples), stopped after `steps` steps with one evaluation over
    `eval_tokens` tokens and one checkpoint at the end."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--dynamo_backend", "no", "base/pretrain.py", recipe, *data, f"out_dir={out_dir}",
            f"train.max_steps={steps}", "train.warmup_steps=2", f"train.eval_interval={steps}",
            f"train.checkpoint_interval={steps}", f"train.eval_tokens={eval_tokens}", "log.wandb=disabled",
            "log.log_interval=1"]


def run_logged(command: list[str], log: Path, timeout: float | None = None) -> int | str:
    """Run `command` from the project's root with its output in `log` (written as it comes, so a
    run cut short keeps it); its exit status, or "timeout" when it ran past `timeout` seconds and
    was stopped with every process it started."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher's worker too
            process.wait()
            return "timeout"
