"""What the benchmarks share: FLOP counts, a matmul peak to compute MFU against, peak memory,
timing, and the peers built with our architecture (transformers' GPT-2, nanoGPT's model.py)."""

from __future__ import annotations

import importlib.util
import statistics
import time

import torch

from codegpt.base.model import GPTConfig


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
