"""Decoding a batch on a CPU: aggregate tokens/s of the engine's step (base/slots.py, as
`codegpt generate` and `codegpt serve` run it) at batch 1, 2, 4, 8 and 16, side by side in one
run: with the int8-ranked decode head (base/decode_head.py) and with the plain fp32 head, the
blocks' weights as they are; then the ranked head with the weights prepacked for MKL
(base/packed_linear.py), and whether the engine's own measurement at its start chose them here.
70M seed shape, random weights (a step costs the same whatever their values), 64-token prompts,
greedy, tokens of the three checked equal.

    .venv/bin/python -m bench.decode_batch [--batches 1 2 4 8 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import cpu_name
from codegpt.base import decode_head
from codegpt.base.generate import banned_ids
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.sampling import Sampling
from codegpt.base.slots import SlotEngine
from codegpt.base.tokenizer import Tokenizer


def decode(model, prompts, banned, eot_id, tokens: int, packed: bool | None) -> tuple[float, list[list[int]], bool]:
    """Aggregate tokens/s of `tokens` steps after the prefill, the tokens, and whether the engine
    packed its weights (a fresh engine, so that it builds its head with the ranker in force)."""
    engine = SlotEngine(model, len(prompts), banned, eot_id, packed=packed)
    engine.add_many([(prompt, Sampling(temperature=0), 0, 0) for prompt in prompts])
    out = [[token for _, token in engine.step()]]
    started = time.perf_counter()
    out += [[token for _, token in engine.step()] for _ in range(tokens - 1)]
    return (tokens - 1) * len(prompts) / (time.perf_counter() - started), out, engine.packed is not None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)
    tokenizer = Tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(dropout=0.0)).eval()
    banned = banned_ids(model, tokenizer, "cpu")
    banned[tokenizer.eot_id] = True
    ranked = decode_head.ranker_for
    print(f"{cpu_name()}, PyTorch kernels {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
          f"threads; 70M fp32, 64-token prompts, {args.tokens} greedy tokens per row\n")
    print("| batch | int8-ranked head tokens/s | plain head tokens/s | ranked / plain | ranked, packed weights "
          "tokens/s | packed / not | packed when measured | tokens equal |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, 100_000, (64,), generator=generator).tolist() for _ in range(batch)]
        results = {}
        for name, ranker, packed in (("plain", lambda weight: None, False), ("ranked", ranked, False),
                                     ("packed", ranked, True)):
            decode_head.ranker_for = ranker
            decode(model, prompts, banned, tokenizer.eot_id, 2, packed)  # warm-up (the int8 copy is built once)
            results[name] = decode(model, prompts, banned, tokenizer.eot_id, args.tokens, packed)
        decode_head.ranker_for = ranked
        chosen = SlotEngine(model, batch, banned, tokenizer.eot_id).packed is not None
        (fast, fast_tokens, _), (plain, plain_tokens, _) = results["ranked"], results["plain"]
        packed_rate, packed_tokens, packed = results["packed"]
        cells = f"{packed_rate:.1f} | {packed_rate / fast:.2f}x" if packed else "- | -"  # one row: none packed
        equal = fast_tokens == plain_tokens and (packed_tokens == fast_tokens or not packed)
        print(f"| {batch} | {fast:.1f} | {plain:.1f} | {fast / plain:.2f}x | {cells} | {'yes' if chosen else 'no'} | "
              f"{equal} |", flush=True)


if __name__ == "__main__":
    main()
