"""Serving under load: `codegpt serve` started as a user starts it, driven by the async `openai`
client.

For each model, `--slots 1` (one request at a time, as the server was before batching) and the
default slots, each with 1, 4, 8 and 16 concurrent clients asking for 128-token completions of
64-token prompts (greedy; vLLM's `min_tokens` holds <|endoftext|> back, so each completion has
its 128 tokens), each level run --rounds times: aggregate tokens/s (the median round), time to
first token and time between tokens (p50, p95 over every round's requests).
Both servers run at once and each level's rounds alternate between them, so that both see the
machine alike; beside them, `codegpt generate`'s batch-1 greedy path (base/generate.py
`token_steps`, in this process, the servers idle), timed the same way (128 tokens from the
prompt, prefill included) in rounds alternating with the servers' one-client rounds; and the
ratio of each level's aggregate tokens/s to --slots 1's.

Models: the 70M seed shape with random weights (a decoding step costs the same whatever the
weights' values), and the demo's model if checkpoints/pretrain-cpu/final exists (else the run
says it was skipped). `--soak N` sends N requests (default 500) to the 70M with two adapters,
mixing the base and the adapters, streamed and not, one in five abandoned by its client midway,
and reports the server's RSS after a warm-up and every 50 requests to the end.

    .venv/bin/python -m bench.serve_load [--clients 1 4 8 16] [--rounds 3] [--soak 500] [--skip-load]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common import cpu_name
from codegpt.base.checkpoint import save_model
from codegpt.base.convert import load_any
from codegpt.base.generate import banned_ids, token_steps
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.provenance import weights_hash
from codegpt.base.sampling import Sampling
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import write_adapter_files
from codegpt.finetune.lora import LoRAConfig, apply_lora

DEMO = Path("checkpoints/pretrain-cpu/final")
PROMPT_TOKENS = 64
NEW_TOKENS = 128


def prompt_ids(tokenizer: Tokenizer, seed: int) -> list[int]:
    """64 ids of real code tokens, different for each client."""
    rng = random.Random(seed)
    return [rng.choice(tokenizer.valid_ids[:100_000]) for _ in range(PROMPT_TOKENS)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


class Served:
    """`codegpt serve MODEL ...` in a process of its own, on a free port."""

    def __init__(self, model: Path, *options: str):
        self.port = free_port()
        self.command = [sys.executable, "-m", "codegpt.serve", str(model), "--port", str(self.port), *options]

    def __enter__(self) -> "Served":
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{' '.join(self.command)} exited: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=60)


async def completion(client, model: str, prompt: list[int], max_tokens: int, record: list) -> None:
    """One streamed completion; records (time to first token, gaps between tokens, tokens)."""
    started = time.perf_counter()
    arrivals, tokens = [], 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"min_tokens": max_tokens})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    record.append((arrivals[0] - started, [b - a for a, b in zip(arrivals, arrivals[1:])], tokens))


async def load_round(url: str, model: str, clients: int, tokenizer: Tokenizer) -> tuple[float, list]:
    """`clients` concurrent clients, one 128-token completion each: the aggregate tokens/s, and
    each request's (time to first token, gaps between tokens, tokens)."""
    from openai import AsyncOpenAI

    record: list = []
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(completion(client, model, prompt_ids(tokenizer, i), NEW_TOKENS, record)
                               for i in range(clients)))
        rate = sum(tokens for _, _, tokens in record) / (time.perf_counter() - started)
    return rate, record


def summary(rates: list[float], record: list) -> dict:
    """The median round's tokens/s, and percentiles over every round's requests."""
    gaps = [gap for _, gaps_of_one, _ in record for gap in gaps_of_one]
    ttft = [first for first, _, _ in record]
    return {"tokens_s": statistics.median(rates), "ttft_p50": percentile(ttft, 0.5),
            "ttft_p95": percentile(ttft, 0.95), "tbt_p50": percentile(gaps, 0.5), "tbt_p95": percentile(gaps, 0.95)}


class Generating:
    """`codegpt generate`'s path in this process: token_steps, batch 1, greedy, <|endoftext|> held
    back, 128 tokens including the prompt's prefill."""

    def __init__(self, model_dir: Path, tokenizer: Tokenizer):
        self.model, self.tokenizer = load_any(model_dir).eval(), tokenizer
        self.banned = banned_ids(self.model, tokenizer, "cpu")
        self.banned[tokenizer.eot_id] = True
        self.rate(0)  # builds the int8 head

    def rate(self, seed: int) -> float:
        started = time.perf_counter()
        steps = token_steps(self.model, [prompt_ids(self.tokenizer, seed)], Sampling(temperature=0), self.banned,
                            self.tokenizer.eot_id)
        for _ in range(NEW_TOKENS):
            next(steps)
        steps.close()
        return NEW_TOKENS / (time.perf_counter() - started)


def row(slots: str, count: int, r: dict) -> str:
    return (f"| --slots {slots} | {count} | {r['tokens_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | "
            f"{r['tbt_p50'] * 1000:.0f} | {r['tbt_p95'] * 1000:.0f} |")


def load_table(model_dir: Path, label: str, clients: list[int], tokenizer: Tokenizer, rounds: int) -> list[str]:
    """The table for one model. Both servers run at once (the idle one waits without using the
    CPU) and each level's rounds alternate between them, and for one client with rounds of
    `codegpt generate`'s path, so that every ratio compares rounds that saw the machine alike."""
    generating = Generating(model_dir, tokenizer)
    name = str(model_dir)
    results, notes = {}, []
    with Served(model_dir, "--slots", "1") as one, Served(model_dir) as batched:
        servers = {"1": one, "default": batched}
        for server in servers.values():
            asyncio.run(load_round(server.url, name, 1, tokenizer))  # warm-up: the int8 head is built
        for count in clients:
            rates: dict[str, list[float]] = {slots: [] for slots in servers}
            records: dict[str, list] = {slots: [] for slots in servers}
            alone = []
            for round_ in range(rounds):
                if count == 1:
                    alone.append(generating.rate(round_))
                for slots, server in servers.items():
                    rate, record = asyncio.run(load_round(server.url, name, count, tokenizer))
                    rates[slots].append(rate)
                    records[slots] += record
            for slots in servers:
                results[slots, count] = summary(rates[slots], records[slots])
                print(row(slots, count, results[slots, count]), flush=True)
                if alone:
                    ours, theirs = results[slots, count]["tokens_s"], statistics.median(alone)
                    notes.append(f"- --slots {slots}, 1 client: {ours:.1f} tokens/s against `codegpt generate`'s "
                                 f"batch-1 greedy path {theirs:.1f} in alternating rounds ({ours / theirs - 1:+.1%}).")
    rows = ["| server | clients | aggregate tokens/s | TTFT p50 s | TTFT p95 s | between tokens p50 ms | p95 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows += [row(slots, count, results[slots, count]) for slots in ("1", "default") for count in clients]
    notes += [f"- {count} clients: default slots {results['default', count]['tokens_s'] / results['1', count]['tokens_s']:.2f}x "
              f"the aggregate tokens/s of --slots 1 in alternating rounds." for count in clients if count > 1]
    return [f"### {label}", "", *rows, "", *notes, ""]


def write_adapters(base: GPT, base_dir: Path, root: Path) -> list[str]:
    """Two adapters of the random 70M, as `codegpt sft` writes them (random factors)."""
    options = []
    for name, lora in (("docstring", LoRAConfig(r=16, targets=["c_attn", "c_proj", "c_fc"])),
                       ("bugfix", LoRAConfig(r=8, targets=["c_attn"]))):
        model = GPT(base.config)
        model.load_state_dict(base.state_dict())
        apply_lora(model, lora)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.normal_(std=0.01)
        (root / name).mkdir()
        write_adapter_files(root / name, model, lora, str(base_dir), weights_hash(base.state_dict()))
        options += ["--adapter", f"{name}={root / name}"]
    return options


async def soak_requests(url: str, base_name: str, total: int, tokenizer: Tokenizer, pid: int) -> list[tuple[int, float]]:
    """`total` requests from 8 concurrent clients: base and adapters, streamed or not, one in five
    abandoned after its first piece (streamed) or a short timeout; RSS every 50 requests."""
    from openai import AsyncOpenAI

    rng = random.Random(0)
    plan = [(rng.choice([base_name, "docstring", "bugfix"]), rng.random() < 0.5, rng.random() < 0.2,
             rng.randint(8, 48)) for _ in range(total)]
    done, samples = 0, [(0, rss_mib(pid))]

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        async def one(model, streamed, abandon, max_tokens, prompt):
            nonlocal done
            if streamed:
                stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                         temperature=0.8, stream=True)
                async for _ in stream:
                    if abandon:
                        break
                await stream.close()
            else:
                try:
                    await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8,
                                                    timeout=0.2 if abandon else 600)
                except Exception as err:
                    if not abandon:
                        raise
                    assert "timed out" in str(err).lower() or "timeout" in type(err).__name__.lower(), err
            done += 1
            if done % 50 == 0:
                samples.append((done, rss_mib(pid)))

        queue = list(enumerate(plan))

        async def worker():
            while queue:
                i, (model, streamed, abandon, max_tokens) = queue.pop(0)
                await one(model, streamed, abandon, max_tokens, prompt_ids(tokenizer, i))

        await asyncio.gather(*(worker() for _ in range(8)))
    return samples


def soak(model_dir: Path, base: GPT, root: Path, total: int, tokenizer: Tokenizer) -> list[str]:
    adapters = write_adapters(base, model_dir, root)
    with Served(model_dir, *adapters) as server:
        samples = asyncio.run(soak_requests(server.url, str(model_dir), total, tokenizer, server.process.pid))
    warm = [rss for count, rss in samples if count >= 50]
    drift = (max(warm) - min(warm)) / warm[0] * 100
    return [f"### Soak: {total} requests, 70M with two adapters",
            "",
            "| requests done | " + " | ".join(str(count) for count, _ in samples) + " |",
            "| --- |" + " ---: |" * len(samples),
            "| server RSS MiB | " + " | ".join(f"{rss:.0f}" for _, rss in samples) + " |",
            "",
            f"After the first 50 (warm-up): RSS {min(warm):.0f}-{max(warm):.0f} MiB, spread {drift:.1f}% of "
            f"{warm[0]:.0f} (target: within ±5%).", ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each level (the median tokens/s is shown)")
    parser.add_argument("--soak", type=int, default=0, help="requests of the memory soak (0: none)")
    parser.add_argument("--skip-load", action="store_true", help="only the soak")
    args = parser.parse_args(argv)
    tokenizer = Tokenizer()
    lines = [f"## Serving load: {cpu_name()}, {os.cpu_count()} CPUs, PyTorch kernels {torch.backends.cpu.get_cpu_capability()}, "
             f"{torch.get_num_threads()} threads", ""]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        seed_shape = GPT(GPTConfig(dropout=0.0)).eval()
        model_dir = Path(tmp) / "seed-70m"
        save_model(model_dir, seed_shape)
        if not args.skip_load:
            lines += load_table(model_dir, "70M seed shape (random weights), fp32", args.clients, tokenizer,
                                args.rounds)
            if DEMO.is_dir():
                lines += load_table(DEMO, f"the demo's model ({DEMO})", args.clients, tokenizer, args.rounds)
            else:
                lines += [f"The demo's model: skipped ({DEMO} does not exist; `make demo` makes it).", ""]
        if args.soak:
            lines += soak(model_dir, seed_shape, Path(tmp), args.soak, tokenizer)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
