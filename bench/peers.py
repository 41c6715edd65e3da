"""CodeGPT against its peers, measured side by side in one run on this machine.

The Hugging Face side is `GPT2LMHeadModel` (sdpa attention) loaded from our weights through
`export_hf`, so both compute the same function (the memory and LoRA processes build each side
alone, from the same architecture, so that no second model sits in their peak); peft wraps it. Contenders alternate in
rounds and each figure is a median with its spread (max - min). Peak memory and LoRA run each
contender in a fresh process. fp32 on CPU, dropout 0 (PyTorch's fused CPU attention has no dropout
and both sides would fall back to the same math kernel).

    .venv/bin/python -m bench.peers [--rounds 5]

a. train step tokens/s, seed config, 1x1024 and 2x256 fp32 (and 1x1024 bf16 autocast where the CPU
   has native bf16)                                        b. peak memory of a train step at 4x1024
c. greedy decode tokens/s, batch 1, 64-token prompt, 128 new, tokens checked equal
d. LoRA SFT step (bench/lora_step.py)                      e. MFU and decode against the bandwidth bound
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

from codegpt.base.convert import export_hf
from codegpt.base.decode_head import has_fast_bf16, has_int8_engine
from codegpt.base.generate import Sampling, banned_ids, token_steps
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.tokenizer import Tokenizer
from bench.common import cpu_name, flops_per_token, hf_gpt2, matmul_peak, peak_rss_mib, summary, timed

CONFIG = GPTConfig(dropout=0.0)


def contenders():
    import transformers

    torch.manual_seed(0)
    ours = GPT(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa")
    return ours, hf


def train_step_fn(kind: str, model, batch: int, block: int, bf16: bool = False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randint(0, 100_000, (batch, block))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, x) if kind == "ours" else model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def memory_worker(kind: str) -> dict:
    torch.manual_seed(0)
    model = GPT(CONFIG) if kind == "ours" else hf_gpt2(CONFIG)
    model.train()
    train_step_fn(kind, model, 4, 1024)()
    return {"kind": kind, "peak_mib": peak_rss_mib()}


def check_same_greedy(ours, hf, prompt, a: list[int], b: list[int], banned) -> str:
    """Both sides must pick the same tokens, except where the two best logits tie to within float
    rounding (random weights make near-ties; past one, the sequences may part for good)."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if same == len(a):
        return f"all {len(a)} tokens equal"
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + a[:same]])).logits[0, -1].masked_fill(banned, float("-inf"))
    gap = (logits[a[same]] - logits[b[same]]).abs().item()
    if gap > 1e-4:
        raise AssertionError(f"greedy tokens part at step {same} with a logit gap of {gap:.2e}")
    return f"{same} of {len(a)} tokens equal, then a near-tie (logit gap {gap:.1e})"


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write)."""
    a = torch.empty(64 << 20, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    times = [timed(lambda: b.copy_(a)) for _ in range(5)]
    return 2 * a.numel() * 4 / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args.worker)))
        return

    rows = []
    ours, hf = contenders()
    ours.train(), hf.train()
    # a. train step throughput, interleaved rounds
    # bf16 autocast only where the CPU multiplies bf16 natively (elsewhere it is ~100x slower)
    settings = [(1, 1024, False), (2, 256, False)] + [(1, 1024, True)] * has_fast_bf16(torch.device("cpu"))
    for batch, block, bf16 in settings:
        steps = {kind: train_step_fn(kind, model, batch, block, bf16) for kind, model in (("ours", ours), ("hf", hf))}
        for step in steps.values():
            step()  # warm-up
        times = {k: [] for k in steps}
        for _ in range(args.rounds):
            for kind, step in steps.items():
                times[kind].append(timed(step))
        a, b = summary(times["ours"], batch * block), summary(times["hf"], batch * block)
        rows.append((f"train tokens/s {batch}x{block}{' bf16 autocast' if bf16 else ''}", a, b,
                     a["median"] / b["median"], ">= 1.3x"))
        if (batch, block, bf16) == (1, 1024, False):
            train_tps = a["median"]

    # c. greedy decode, tokens checked equal (fresh copies: the train steps above moved the weights)
    ours, hf = contenders()
    ours.eval(), hf.eval()
    tokenizer = Tokenizer()
    banned = banned_ids(ours, tokenizer, "cpu")
    banned[tokenizer.eot_id] = True  # run all 128 steps on both sides
    prompt = torch.randint(0, 100_000, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = Sampling(temperature=0)

    def ours_decode():
        steps = token_steps(ours, [prompt], greedy, banned, tokenizer.eot_id)
        return [next(steps)[0] for _ in range(128)]

    suppress = torch.nonzero(banned).flatten().tolist()

    def hf_decode():
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=128, min_new_tokens=128, do_sample=False,
                              suppress_tokens=suppress, pad_token_id=0)
        return out[0, 64:].tolist()

    agreement = check_same_greedy(ours, hf, prompt, ours_decode(), hf_decode(), banned)
    times = {"ours": [], "hf": []}
    for _ in range(args.rounds):
        times["ours"].append(timed(ours_decode))
        times["hf"].append(timed(hf_decode))
    a, b = summary(times["ours"], 128), summary(times["hf"], 128)
    rows.append(("greedy decode tokens/s (tokens equal)", a, b, a["median"] / b["median"], ">= 2x"))
    decode_tps = a["median"]

    # b. peak memory, d. LoRA: fresh processes
    memory = {}
    for kind in ("ours", "hf"):
        out = subprocess.run([sys.executable, "-m", "bench.peers", "--worker", kind], capture_output=True, text=True, check=True)
        memory[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    rows.append(("train step peak MiB 4x1024", {"median": memory["ours"], "spread": 0}, {"median": memory["hf"], "spread": 0},
                 memory["ours"] / memory["hf"], "<= 0.4x"))
    lora = {}
    for kind in ("ours-lora", "peft-lora"):
        out = subprocess.run([sys.executable, "-m", "bench.lora_step", "--worker", kind],
                             capture_output=True, text=True, check=True)
        lora[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(("LoRA step tokens/s 4x512", {"median": 2048 / lora["ours-lora"]["step_s"], "spread": 0},
                 {"median": 2048 / lora["peft-lora"]["step_s"], "spread": 0},
                 lora["peft-lora"]["step_s"] / lora["ours-lora"]["step_s"], ">= 1.0x"))
    rows.append(("LoRA step peak MiB", {"median": lora["ours-lora"]["peak_mib"], "spread": 0},
                 {"median": lora["peft-lora"]["peak_mib"], "spread": 0},
                 lora["ours-lora"]["peak_mib"] / lora["peft-lora"]["peak_mib"], "<= 1.0x"))

    # e. efficiency against this machine's own limits
    peak = matmul_peak("cpu")
    mfu = train_tps * flops_per_token(CONFIG) / peak
    # What one decode step reads: fp32 weights, but the head in the ranking copy's precision
    # (base/decode_head.py: int8, else bf16 where it is fast, else the fp32 head itself).
    head_params = CONFIG.vocab_size * CONFIG.n_embd
    head_bytes = 1 if has_int8_engine() else 2 if has_fast_bf16(torch.device("cpu")) else 4
    weight_bytes = (GPT(CONFIG).num_params() - head_params) * 4 + head_params * head_bytes
    bound = copy_bandwidth() / weight_bytes

    print(f"CodeGPT-70M vs transformers {__import__('transformers').__version__} / peft {__import__('peft').__version__}, "
          f"CPU ({cpu_name()}, torch capability {torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads, fp32, {args.rounds} rounds (median, spread)")
    print(f"{'measure':<40}{'CodeGPT':>18}{'HF / peft':>18}{'ratio':>8}{'target':>10}")
    for name, a, b, ratio, target in rows:
        print(f"{name:<40}{a['median']:>11,.1f} ±{a['spread']:<5.1f}{b['median']:>11,.1f} ±{b['spread']:<5.1f}"
              f"{ratio:>7.2f}x{target:>10}")
    print(f"train-step MFU (1x1024): {mfu:.0%} of a measured {peak / 1e9:.0f} GFLOP/s matmul peak (target >= 70%)")
    print(f"greedy decode tokens: {agreement}")
    print(f"greedy decode: {decode_tps:.1f} tokens/s = {decode_tps / bound:.0%} of the bandwidth bound "
          f"({bound:.1f} tokens/s: {weight_bytes / 1e6:.0f} MB of weights per token, the head in "
          f"{ {1: 'int8', 2: 'bf16', 4: 'fp32'}[head_bytes]}, over a measured copy bandwidth)")


if __name__ == "__main__":
    main()
