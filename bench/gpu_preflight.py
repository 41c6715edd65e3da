"""The first minutes on a GPU: every CUDA-only path run once, PASS or FAIL for each with its error.

    python -m bench.gpu --preflight --sections none            # the checks alone (meant for < 3 min)
    python -m bench.gpu --preflight --nanogpt PATH/model.py    # the checks, then the whole bench
    python -m bench.gpu --preflight --smoke --sections none    # tiny shapes on CPU

Each check runs in a process of its own (forked from a clean server, so none inherits another's
CUDA state) under its own time limit, so one that fails, hangs or kills its process stops none of
the others; a few run at once (--jobs). preflight.md and preflight.json in the out directory are
rewritten as each one ends, a failure's with the end of its output; the whole of each check's
output is in logs/<check>.log under the work directory (the out directory stays a few files).

On a CPU (--smoke) the checks run at tiny shapes: the decode checks compare the fixed-shape step a
GPU captures, run eagerly, with the eager step over the rows and positions in use; the train step
compiles with the aot_eager backend (tracing, autograd and fullgraph as on a GPU, without
inductor's minute of code generation on 2 cores); what only CUDA can show reports SKIP.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import torch

from codegpt.base import slots
from codegpt.base.generate import banned_ids, generate, token_steps
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.optimizers import make_optimizers
from codegpt.base.recipe import LogConfig, TrainConfig
from codegpt.base.run_dir import QUALITY_FILE
from codegpt.base.sampling import Sampling
from codegpt.base.tokenizer import Tokenizer
from bench.common import ROOT, fresh, local_shards, pretrain_command, run_logged

GREEDY = Sampling(temperature=0.0)
# The pretraining command's data and evaluation: 8 validation batches of the 70M recipe on a GPU;
# on a CPU 4 of the tiny recipe's, from the first 500,000 tokens of the standard library.
COMMAND_DATA = {"cuda": dict(eval_tokens=131_072), "cpu": dict(eval_tokens=16_384, max_tokens=500_000)}


class Skip(Exception):
    """The check needs what this machine lacks; the message says what."""


class Failed(Exception):
    """The check ran and found something wrong; the message says what."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Where and at what size the checks run."""

    device: torch.device
    config: GPTConfig  # the model of the decode, train-step, Muon and serve checks
    recipe: str  # the pretraining command's
    out: Path  # preflight.md, preflight.json
    work: Path  # shards, runs, models and logs/<check>.log

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, check: str) -> Path:
        return self.work / "logs" / f"{check}.log"


# --- decoding ----------------------------------------------------------------------------------

def code_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens of real code (argparse's source: every Python has it), for prompts of any length."""
    import argparse

    return tokenizer.encode(Path(argparse.__file__).read_text())


def decode_model(setup: Setup, dtype: torch.dtype) -> tuple[GPT, Tokenizer, torch.Tensor]:
    """The check's model with matrices far from their initialisation, so that logits are peaked and
    greedy text varies: equal tokens then mean equal computations, not a flat distribution's ties
    (norms and biases stay at theirs: a random LayerNorm bias makes every step pick the same few
    tokens). float32 means float32: TF32 matmuls off."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = GPT(setup.config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    model = model.to(setup.device, dtype).eval()
    tokenizer = Tokenizer()
    return model, tokenizer, banned_ids(model, tokenizer, setup.device)


def replay_eagerly(step: Callable[[], torch.Tensor], device) -> tuple[Callable[[], None], torch.Tensor]:
    """What `slots.capture_graph` gives, without CUDA: each replay recomputes the output in place."""
    output = step()
    return (lambda: output.copy_(step())), output


@contextlib.contextmanager
def fixed_shape_step(setup: Setup):
    """On a CPU, the engine's graph path with the captured step run eagerly (every row, every
    position, reading only tensors set in place), as a CUDA graph replays it."""
    if setup.cuda:
        yield
        return
    saved = slots.graphs_available, slots.capture_graph
    slots.graphs_available, slots.capture_graph = (lambda device: True), replay_eagerly
    try:
        yield
    finally:
        slots.graphs_available, slots.capture_graph = saved


def decoded(model: GPT, tokenizer: Tokenizer, banned: torch.Tensor, prompts: list[list[int]], sampling: Sampling,
            steps: int, graphs: bool) -> list[list[int]]:
    """Each row's first `steps` tokens from `token_steps`."""
    rows = token_steps(model, prompts, sampling, banned, tokenizer.eot_id, graphs=graphs)
    try:
        tokens = [next(rows) for _ in range(steps)]
    finally:
        rows.close()
    return [list(row) for row in zip(*tokens)]


def capture_seconds(model: GPT, tokenizer: Tokenizer, banned: torch.Tensor, rows: int) -> float:
    """How long capturing the step of the engine `token_steps` kept for `rows` rows took; a
    failure when that engine decoded eagerly (its capture failed)."""
    engine = slots.shared_engine(model, rows, banned, tokenizer.eot_id, graphs=True)
    expect(engine.capture_seconds is not None,
           "the decoding step was not captured as a CUDA graph: it decoded eagerly (the log has the warning)")
    return engine.capture_seconds


def divergence(got: list[list[int]], expected: list[list[int]]) -> str | None:
    """Where two runs' tokens first differ (row, step, the tokens), or None when all are equal."""
    for row, (a, b) in enumerate(zip(got, expected)):
        for step, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"row {row} differs first at step {step + 1} of {len(a)}: graph {x}, eager {y}"
    return None


def graph_against_eager(setup: Setup, dtype: torch.dtype, prompts: list[list[int]] | Callable, sampling: Sampling,
                        steps: int) -> tuple[str, list[list[int]], tuple]:
    """Decode `prompts` (or the prompts made from the code's tokens) with the graph path and
    eagerly; a failure naming the first difference. Returns a note on the graph, the tokens and
    (model, tokenizer, banned)."""
    model, tokenizer, banned = decode_model(setup, dtype)
    if callable(prompts):
        prompts = prompts(code_ids(tokenizer))
    with fixed_shape_step(setup):
        graphed = decoded(model, tokenizer, banned, prompts, sampling, steps, graphs=True)
        seconds = capture_seconds(model, tokenizer, banned, len(prompts))
    eager = decoded(model, tokenizer, banned, prompts, sampling, steps, graphs=False)
    expect(divergence(graphed, eager) is None, str(divergence(graphed, eager)))
    distinct = len({t for row in graphed for t in row})
    expect(distinct > steps // 4, f"{distinct} distinct tokens: too few for equal ones to mean anything")
    note = f"captured in {seconds:.2f} s" if setup.cuda else "the fixed-shape step run eagerly (no CUDA)"
    return note, graphed, (model, tokenizer, banned)


def check_decode_fp32(setup: Setup) -> str:
    """batch-1 greedy in fp32 with TF32 off: the graph's 64 tokens equal eager decoding's"""
    note, _, _ = graph_against_eager(setup, torch.float32, lambda code: [code[:64]], GREEDY, 64)
    return f"64 of 64 tokens equal; {note}"


def check_decode_bf16(setup: Setup) -> str:
    """batch-1 greedy with bf16 weights: equal means the same 64 tokens; a failure names the first divergence"""
    note, _, _ = graph_against_eager(setup, torch.bfloat16, lambda code: [code[:64]], GREEDY, 64)
    return f"64 of 64 tokens equal; {note}"


def check_decode_rebuild(setup: Setup) -> str:
    """the context fills: the cache is rebuilt from its last 3/4, graph equal to eager across it"""
    block = setup.config.block_size
    steps = 32
    note, _, _ = graph_against_eager(setup, torch.float32, lambda code: [code[: block - 8]], GREEDY, steps)
    return f"{block - 8}-token prompt in a {block}-token context: {steps} tokens equal across the rebuild; {note}"


def check_decode_batch(setup: Setup) -> str:
    """prompts of different lengths, one empty, in one batch: graph equal to eager and to each prompt alone"""
    def prompts(code):
        return [code[:50], [], code[100:107]]

    steps = 32
    note, batch, (model, tokenizer, banned) = graph_against_eager(setup, torch.float32, prompts, GREEDY, steps)
    with fixed_shape_step(setup):
        for row, prompt in enumerate(prompts(code_ids(tokenizer))):
            (alone,) = decoded(model, tokenizer, banned, [prompt], GREEDY, steps, graphs=True)
            expect(alone == batch[row], f"row {row} ({len(prompt)}-token prompt) decodes otherwise alone: "
                                        f"{divergence([batch[row]], [alone])}")
    return f"3 rows (50, 0 and 7 prompt tokens) x {steps} tokens equal to eager and to each prompt alone; {note}"


def check_decode_topk(setup: Setup) -> str:
    """seeded top-k sampling (T 0.8, k 50): graph equal to eager, and to itself run again"""
    def prompts(code):
        return [code[:40], code[200:230]]

    sampling = Sampling(temperature=0.8, top_k=50, seed=3)
    steps = 48
    note, first, (model, tokenizer, banned) = graph_against_eager(setup, torch.float32, prompts, sampling, steps)
    with fixed_shape_step(setup):
        again = decoded(model, tokenizer, banned, prompts(code_ids(tokenizer)), sampling, steps, graphs=True)
    expect(again == first, f"the same seed drew otherwise the second time: {divergence(again, first)}")
    return f"2 rows x {steps} sampled tokens equal to eager and to a second run; {note}"


def check_decode_graph_capture(setup: Setup) -> str:
    """one capture per batch size, reused across calls and a rebuild; capture time apart from time per token"""
    if not setup.cuda:
        raise Skip("no CUDA device: nothing to capture (the decode checks ran the fixed-shape step eagerly)")
    model, tokenizer, banned = decode_model(setup, torch.float32)
    captures = []
    real_capture = slots.capture_graph

    def counted(step, device):
        started = time.perf_counter()
        result = real_capture(step, device)
        captures.append(time.perf_counter() - started)
        return result

    slots.capture_graph = counted
    try:
        generate(model, tokenizer, ["def parse(text):\n"], Sampling(max_new_tokens=32, temperature=0))
        generate(model, tokenizer, ["import os\n"], Sampling(max_new_tokens=32, temperature=0.8, top_k=50, seed=0))
        generate(model, tokenizer, [tokenizer.decode(code_ids(tokenizer)[: setup.config.block_size - 8])],
                 Sampling(max_new_tokens=32, temperature=0))  # rebuilds the cache at its 9th token
    finally:
        slots.capture_graph = real_capture
    expect(len(captures) == 1, f"3 calls of one prompt each captured {len(captures)} graphs, not 1")
    rates = {}
    prompt = [code_ids(tokenizer)[:64]]
    for graphs in (True, False):
        decoded(model, tokenizer, banned, prompt, GREEDY, 8, graphs)  # the eager engine's first use
        torch.cuda.synchronize()
        started = time.perf_counter()
        decoded(model, tokenizer, banned, prompt, GREEDY, 128, graphs)
        torch.cuda.synchronize()
        rates[graphs] = (time.perf_counter() - started) / 128 * 1e3
    return (f"1 capture in 3 calls ({captures[0]:.2f} s); batch-1 fp32 decode {rates[True]:.2f} ms per token with "
            f"the graph, {rates[False]:.2f} eagerly (prefill included)")


# --- training ----------------------------------------------------------------------------------

def check_train_step(setup: Setup) -> str:
    """the compiled train step with the loss, bf16 autocast, fullgraph=True (no graph break), against eager"""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = GPT(setup.config).to(setup.device)
    compiled_model = copy.deepcopy(eager)
    backend = "inductor" if setup.cuda else "aot_eager"
    step = torch.compile(compiled_model, fullgraph=True, backend=backend)
    micro_batch = 16 if setup.cuda else 2
    batches = [torch.randint(0, 100_000, (2, micro_batch, setup.config.block_size), device=setup.device)
               for _ in range(2)]
    optimizer = torch.optim.AdamW(compiled_model.parameters(), lr=1e-4, fused=True)
    losses = {}
    for name, model in (("compiled", step), ("eager", eager)):
        started = time.perf_counter()
        with torch.autocast(setup.device.type, dtype=torch.bfloat16):
            losses[name] = model(*batches[0])
        losses[name].backward()
        if name == "compiled":
            compile_seconds = time.perf_counter() - started
    expect(torch.isfinite(losses["compiled"]).item(), f"the compiled loss is {losses['compiled'].item()}")
    difference = abs(losses["compiled"].item() - losses["eager"].item()) / losses["eager"].item()
    expect(difference < 1e-2, f"loss {losses['compiled'].item():.5f} compiled, {losses['eager'].item():.5f} eager")
    worst = max(((p.grad - q.grad).norm() / q.grad.norm()).item()
                for p, q in zip(compiled_model.parameters(), eager.parameters()))
    expect(worst < 5e-2, f"a gradient differs from eager's by {worst:.1%} of its norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(setup.device.type, dtype=torch.bfloat16):
        second = step(*batches[1])
    second.backward()
    optimizer.step()
    expect(torch.isfinite(second).item(), f"the second step's loss is {second.item()}")
    train_graphs = counters["stats"]["unique_graphs"]
    compiled_model.eval()
    with torch.no_grad(), torch.autocast(setup.device.type, dtype=torch.bfloat16):
        step(*batches[1])
    return (f"loss {losses['compiled'].item():.4f} compiled, {losses['eager'].item():.4f} eager; gradients within "
            f"{worst:.1e} of eager's; first step {compile_seconds:.0f} s ({backend}); graphs compiled: "
            f"{train_graphs} for 2 train steps, {counters['stats']['unique_graphs']} with an evaluation under no_grad")


def check_muon(setup: Setup) -> str:
    """Muon's step on the model's block matrices: Newton-Schulz in bf16 on a GPU, equal to torch.optim.Muon's"""
    torch.manual_seed(0)
    model = GPT(setup.config).to(setup.device)
    _, muon = make_optimizers(model, TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.01), setup.device)
    ns_dtype = muon.param_groups[0]["ns_dtype"]
    expect(ns_dtype == (torch.bfloat16 if setup.cuda else torch.float32), f"Newton-Schulz in {ns_dtype}")
    muon.param_groups[0]["ns_dtype"] = torch.bfloat16  # on a CPU too: the iterations a GPU runs
    ours = muon.param_groups[0]["params"]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    before = [p.detach().clone() for p in ours]
    x = torch.randint(0, 100_000, (2, setup.config.block_size), device=setup.device)
    with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.cuda):
        model(x, x).backward()
    for p, q in zip(ours, theirs):
        q.grad = p.grad.clone()
    muon.step()
    reference.step()
    # torch's iterations always run in bf16: the same operations, so the same bits.
    worst = max(((p - q).norm() / (q - b).norm()).item() for p, q, b in zip(ours, theirs, before))
    expect(worst <= 1e-6, f"an update differs from torch.optim.Muon's by {worst:.1e} of its norm")
    where = "" if setup.cuda else f" (this device's default is {str(ns_dtype).removeprefix('torch.')})"
    return f"{len(ours)} matrices, Newton-Schulz in bf16{where}: updates within {worst:.1e} of torch.optim.Muon's"


# --- the commands ------------------------------------------------------------------------------

def last_lines(log: Path, count: int = 1) -> str:
    lines = [line[-300:] for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(lines[-count:]) if lines else "(no output)"


def run_error(log: Path) -> str:
    """A command's own error (its one-line error, or its traceback's last line), not the launcher's
    report that it exited."""
    errors = [line for line in log.read_text(errors="replace").splitlines()
              if re.match(r"(Error: |[\w.]*(Error|Exception)\b)", line) and "CalledProcessError" not in line]
    return errors[0][-300:] if errors else last_lines(log)


def check_pretrain_command(setup: Setup) -> str:
    """`accelerate launch base/pretrain.py` for 3 steps as users run it, closing quality samples included"""
    shards = local_shards(setup.recipe, setup.work, **COMMAND_DATA[setup.device.type])
    run = fresh(setup.work, "run")
    log = setup.work / "logs" / "pretrain_command-run.log"
    started = time.perf_counter()
    eval_tokens = COMMAND_DATA[setup.device.type]["eval_tokens"]
    status = run_logged(pretrain_command(setup.recipe, shards.overrides, run, 3, eval_tokens), log)
    wall = time.perf_counter() - started
    if status != 0:
        print(last_lines(log, 30))  # the end of the run's output, for the report
        raise Failed(f"exit {status}: {run_error(log)}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    expect(len(losses) == 3 and all(math.isfinite(x) for x in losses), f"losses logged: {losses}")
    val = [r["val_loss"] for r in records if "val_loss" in r]
    quality = json.loads((run / QUALITY_FILE).read_text())
    expect(quality["samples"] == LogConfig().quality_samples, f"{quality['samples']} quality samples")
    graph_warnings = [line for line in log.read_text().splitlines() if "CUDA graph" in line and "failed" in line]
    expect(not graph_warnings, graph_warnings[0] if graph_warnings else "")
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return (f"exit 0 in {wall:.0f} s; losses {', '.join(f'{x:.3f}' for x in losses)}, val {val[-1]:.3f}; "
            f"{quality['parsable']} of {quality['samples']} quality samples parse; {rates[-1]:,.0f} tokens/s at "
            f"step 3; {shards.val_rows} validation rows at val_fraction {shards.val_fraction:g}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    """GET `url`, or POST `body` to it as JSON; the JSON answer. An error status is a failure
    naming it; no answer at all (refused, timed out) an OSError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise Failed(f"{request.get_method()} {url} answered {err.code}: {err.read()[:300]!r}") from None


def check_serve(setup: Setup) -> str:
    """`codegpt serve` as a process on a port: POST /v1/completions gets the text generate() gives"""
    from codegpt.base.checkpoint import save_model

    model, tokenizer, _ = decode_model(setup, torch.float32)
    path = save_model(fresh(setup.work, "model"), model.cpu())
    prompt, new_tokens = "def parse(text):\n", 16
    expected = generate(model.to(setup.device), tokenizer, [prompt],
                        Sampling(max_new_tokens=new_tokens, temperature=0))[0]
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-m", "codegpt.serve", str(path), "--served-model-name", "preflight",
                               "--port", url.rsplit(":", 1)[1]], cwd=ROOT)
    try:
        while True:  # until the model is loaded and the app answers
            expect(server.poll() is None, f"the server exited with status {server.returncode} before answering: "
                                          f"{last_lines(setup.log('serve'))}")
            try:
                models = http_json(f"{url}/v1/models", timeout=5)
                break
            except OSError:  # refused, or not answering yet
                time.sleep(0.5)
        expect([m["id"] for m in models["data"]] == ["preflight"], f"GET /v1/models lists {models}")
        started = time.perf_counter()
        answer = http_json(f"{url}/v1/completions", {"model": "preflight", "prompt": prompt, "max_tokens": new_tokens,
                                                     "temperature": 0.0})
        seconds = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = answer["choices"][0]["text"]
    expect(bool(expected) and text == expected, f"the server answered {text!r}; generate() gives {expected!r}")
    return f"POST /v1/completions answered in {seconds:.2f} s with the {new_tokens} greedy tokens generate() gives"


# Longest first: with several at once, the command and the compile overlap the rest.
CHECKS: dict[str, tuple[Callable[[Setup], str], float]] = {
    "pretrain_command": (check_pretrain_command, 300),
    "train_step": (check_train_step, 240),
    "serve": (check_serve, 120),
    "decode_fp32": (check_decode_fp32, 90),
    "decode_bf16": (check_decode_bf16, 90),
    "decode_rebuild": (check_decode_rebuild, 90),
    "decode_batch": (check_decode_batch, 90),
    "decode_topk": (check_decode_topk, 90),
    "decode_graph_capture": (check_decode_graph_capture, 90),
    "muon": (check_muon, 90),
}


# --- running them ------------------------------------------------------------------------------

def run_check(name: str, check: Callable[[Setup], str], setup: Setup, result: Path) -> None:
    """In the check's own process: its output to its log, its outcome to `result`."""
    os.setsid()  # its own process group: a check stopped at its limit takes what it started along
    log = os.open(setup.log(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    started = time.perf_counter()
    try:
        status, detail = "PASS", check(setup)
    except Skip as skip:
        status, detail = "SKIP", str(skip)
    except Failed as failed:
        status, detail = "FAIL", str(failed)
    except BaseException as err:  # whatever a check meets is its finding, reported as it is
        traceback.print_exc()
        status, detail = "FAIL", f"{type(err).__name__}: {str(err)[:500]}"
    sys.stdout.flush()
    result.write_text(json.dumps({"status": status, "detail": detail, "seconds": time.perf_counter() - started}))


class Report:
    """preflight.md and preflight.json, rewritten as each check ends."""

    def __init__(self, out: Path, header: str):
        self.out, self.header, self.rows = out, header, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(f"{row['status']} {row['check']} ({row['seconds']:.0f} s): {row['detail']}", flush=True)
        if "output" in row:
            print(textwrap.indent(row["output"], "    "), flush=True)
        table = ["| check | what it runs | result | seconds | detail |", "| --- | --- | --- | ---: | --- |"]
        table += [f"| {r['check']} | {r['what']} | {r['status']} | {r['seconds']:.0f} | "
                  f"{r['detail'].replace('|', '/')} |" for r in self.rows]
        (self.out / "preflight.md").write_text("\n".join([self.header, "", *table, ""]))
        record = {"header": self.header, "checks": self.rows}
        (self.out / "preflight.json").write_text(json.dumps(record, indent=2) + "\n")


def outcome(name: str, check: Callable, limit: float, setup: Setup, process, result: Path, stopped: bool,
            seconds: float) -> dict:
    row = {"check": name, "what": check.__doc__, "seconds": seconds}
    if result.exists():
        row |= json.loads(result.read_text())
    elif stopped:
        row |= {"status": "FAIL", "detail": f"stopped at its limit of {limit:.0f} s"}
    else:
        row |= {"status": "FAIL", "detail": f"its process died (exit code {process.exitcode})"}
    if row["status"] == "FAIL":
        row["output"] = last_lines(setup.log(name), 30)
    return row


def preflight(setup: Setup, header: str, checks: dict[str, tuple[Callable[[Setup], str], float]],
              jobs: int = 1) -> list[dict]:
    """Run `checks` (name: (check, time limit in seconds)), `jobs` at a time; returns their rows."""
    setup.out.mkdir(parents=True, exist_ok=True)
    (setup.work / "logs").mkdir(parents=True, exist_ok=True)
    report = Report(setup.out, header)
    # Checks fork from a server that imported this module and ran nothing: a process forked after
    # running OpenMP code, or after CUDA started, can hang or fail.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    waiting, running = list(checks), {}
    while waiting or running:
        while waiting and len(running) < jobs:
            name = waiting.pop(0)
            result = setup.work / f"preflight-{name}.json"
            result.unlink(missing_ok=True)
            process = context.Process(target=run_check, args=(name, checks[name][0], setup, result))
            process.start()
            running[name] = (process, result, time.monotonic())
        time.sleep(0.2)
        for name, (process, result, started) in list(running.items()):
            seconds = time.monotonic() - started
            stopped = process.is_alive()
            if stopped and seconds < checks[name][1]:
                continue
            if stopped:  # the check and every process it started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.join()
            report.add(outcome(name, *checks[name], setup, process, result, stopped, seconds))
            del running[name]
    return report.rows
