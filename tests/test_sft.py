"""Fine-tuning through its commands: LoRA SFT saves only the adapter and resumes, full fine-tuning
is one switch, two DDP ranks match one process, the merged model samples what base + adapter
samples, and bad inputs are refused before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codegpt.base.checkpoint import load_model, save_model

from codegpt.base.provenance import weights_hash
from codegpt.base.generate import Sampling, generate
from codegpt.base.model import GPT, GPTConfig
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import load_for_inference
from codegpt.finetune.packing import PAD_SEGMENT, PackedBatches, encode_example, pack

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TWO_RANKS = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small random base and docstring data from the standard library's json and email packages."""
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    save_model(root / "base", base)
    import email
    import json as json_package

    overrides = [f"base={root / 'base'}", "task.source=local", f"task.data_dir={root / 'data'}",
                 f"task.paths=[{Path(json_package.__file__).parent}, {Path(email.__file__).parent}]",
                 "task.val_fraction=0.2", "task.max_chars=600", "block_size=128", "train.micro_batch_size=4",
                 "train.batch_tokens=1024", "train.warmup_steps=1", "train.eval_interval=2", "train.eval_tokens=512",
                 "train.checkpoint_interval=2", "log.log_interval=1", "train.time_budget_minutes=null"]
    return root, overrides


def sft(*args, launcher=(sys.executable,), env=None):
    command = [*launcher, str(ROOT / "finetune/sft.py"), str(ROOT / "recipes/docstring-tiny.yaml"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          timeout=600)


def losses(run: Path):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_lora_sft_trains_only_the_adapter_and_resumes(setup):
    root, overrides = setup
    out = root / "lora"
    first = sft(*overrides, f"out_dir={out}", "train.max_steps=2")
    assert first.returncode == 0, first.stderr
    assert "trainable parameters" in first.stdout and (root / "data/train.jsonl").exists()
    assert sorted(os.listdir(out / "final")) == ["adapter.json", "adapter.safetensors"]
    adapter = json.loads((out / "final/adapter.json").read_text())
    assert adapter["base_hash"] == weights_hash(load_model(root / "base").state_dict())
    assert all("lora_" in key for key in load_file(out / "final/adapter.safetensors"))

    more = sft(*overrides, f"out_dir={out}", "train.max_steps=4")
    assert more.returncode == 0, more.stderr
    assert "resumed from" in more.stdout and len(losses(out)) == 4
    model, _ = load_for_inference(out / "final")
    assert model.transformer.h[0].attn.c_attn.lora_B.abs().sum() > 0  # the adapter learned something
    assert torch.equal(model.transformer.wte.weight, load_model(root / "base").transformer.wte.weight)


def test_full_fine_tuning_is_one_switch(setup):
    root, overrides = setup
    result = sft(*overrides, f"out_dir={root / 'full'}", "method=full", "train.max_steps=2")
    assert result.returncode == 0, result.stderr
    tuned = load_model(root / "full/final")
    assert not torch.equal(tuned.transformer.wte.weight, load_model(root / "base").transformer.wte.weight)


def test_two_ddp_ranks_match_one_process(setup):
    root, overrides = setup
    # Micro-batches of 2: the 7 validation rows hold a batch for each of two ranks.
    common = [*overrides, "train.max_steps=2", "train.eval_interval=100", "train.micro_batch_size=2"]
    one = sft(*common, f"out_dir={root / 'one'}")
    two = sft(*common, f"out_dir={root / 'two'}", launcher=TWO_RANKS, env={"ACCELERATE_USE_CPU": "1"})
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert json.loads((root / "two/run.json").read_text())["processes"] == 2
    one_losses, two_losses = losses(root / "one"), losses(root / "two")
    assert two_losses[0] == pytest.approx(one_losses[0], rel=1e-6)
    # Adam's first update is about lr * sign(gradient): gradient entries that are zero up to float
    # rounding (the all-reduce sums in another order) can flip sign, so step 2 agrees less closely.
    assert two_losses[1] == pytest.approx(one_losses[1], rel=1e-3)


def test_merged_model_samples_the_same_greedy_tokens(setup, tmp_path):
    root, overrides = setup
    out = root / "merge-source"
    assert sft(*overrides, f"out_dir={out}", "train.max_steps=2", "lora.r=4").returncode == 0
    merged = subprocess.run([sys.executable, "-m", "codegpt.finetune.merge", str(out / "final"), str(tmp_path / "merged")],
                            capture_output=True, text=True, cwd=ROOT)
    assert merged.returncode == 0, merged.stderr
    plain = load_model(tmp_path / "merged")  # no LoRA code involved
    adapted, _ = load_for_inference(root / "base", out / "final")
    tokenizer, greedy = Tokenizer(), Sampling(max_new_tokens=40, temperature=0)
    prompts = ['def parse(text):\n    """Parse a header."""\n', "class Message:\n"]
    assert generate(plain, tokenizer, prompts, greedy) == generate(adapted, tokenizer, prompts, greedy)


@pytest.mark.parametrize("override,message", [
    ("base=/no/such/model", "base: /no/such/model not found"),
    ("task.name=docstrings", "task.name: unknown task 'docstrings'"),
    ("lora.targets=[q_proj]", "lora.targets: 'q_proj' matches no linear layer"),
    ("lora.r=0", "lora.r: must be positive, got 0"),
])
def test_refusals_before_work(setup, override, message, tmp_path):
    _, overrides = setup
    result = sft(*overrides, f"out_dir={tmp_path / 'run'}", override)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_sft_never_writes_over_a_pretraining_run_nor_the_base_inside_it(setup, tmp_path):
    """The issue's data loss: `base=R/final out_dir=R train.resume=false` on a pretraining run R
    deleted R/final's model and pruned R's checkpoints. Refused in one line, every file kept, and
    no refusal suggests train.resume=false."""
    from tests.test_run_dir import tree
    from tests.test_train import run_loop

    root, overrides = setup
    run = tmp_path / "pretraining-run"
    run_loop(run, max_steps=6)
    before = tree(run)
    others = [o for o in overrides if not o.startswith("base=")]
    for args, names in (([f"base={run / 'final'}", "train.resume=false"], f"holds {run / 'final'}, the base model"),
                        ([f"base={run / 'final'}"], f"holds {run / 'final'}, the base model"),
                        ([f"base={root / 'base'}", "train.resume=false"], "holds a pretraining run")):
        result = sft(*others, *args, f"out_dir={run}", "train.max_steps=1")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {run}: ") and names in result.stderr, result.stderr
        assert "resume=false" not in result.stderr and "Traceback" not in result.stderr
        assert tree(run) == before


def test_adapter_on_another_base_is_refused(setup, tmp_path):
    root, overrides = setup
    out = root / "lora-for-refusal"
    assert sft(*overrides, f"out_dir={out}", "train.max_steps=1").returncode == 0
    torch.manual_seed(1)
    save_model(tmp_path / "other", GPT(GPTConfig(block_size=128, n_layer=1, n_head=2, n_embd=32)))
    result = subprocess.run([sys.executable, "-m", "codegpt.finetune.sample", str(tmp_path / "other"), "--adapter",
                             str(out / "final")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "trained on another base" in result.stderr


def test_prompt_labels_are_masked_and_packing_keeps_examples_apart():
    tokenizer = Tokenizer()
    inputs, labels = encode_example(tokenizer, "def f():\n", "    return 1\n")
    prompt_len = len(tokenizer.encode("def f():\n"))
    assert labels[: prompt_len - 1] == [-100] * (prompt_len - 1)
    assert labels[prompt_len - 1 :] == tokenizer.encode("    return 1\n") + [tokenizer.eot_id]
    assert inputs[1:] == (tokenizer.encode("def f():\n") + tokenizer.encode("    return 1\n"))[1:]
    rows = pack([([1, 2, 3], [2, 3, 4]), ([5, 6], [6, 7]), ([8, 9, 10, 11], [9, 10, 11, 12])], block_size=6)
    assert [r[0] for r in rows] == [[1, 2, 3, 5, 6, 0], [8, 9, 10, 11, 0, 0]]
    assert [r[2] for r in rows] == [[0, 0, 0, 1, 1, PAD_SEGMENT], [0, 0, 0, 0, PAD_SEGMENT, PAD_SEGMENT]]
    assert rows[0][1][-1] == -100
    batches = PackedBatches([([1] * 5, [1] * 5)] * 10 + [([1] * 9, [1] * 9)], block_size=8, micro_batch_size=2)
    assert batches.dropped_too_long == 1 and batches.rows_per_epoch == 10


def test_lora_initial_weights_follow_train_seed(setup):
    """lora_B starts at zero, so lora_A gets no gradient on the first step (and the tiny recipe has
    no weight decay): after one step the adapter's A is still its initialisation, which must be
    the one train.seed draws."""
    from codegpt.base.recipe_loader import load_recipe
    from codegpt.finetune.lora import apply_lora, lora_layers
    from codegpt.finetune.recipe import SFTRecipe

    root, overrides = setup
    drawn = {}
    for seed in (1, 2):
        out = root / f"seed-{seed}"
        result = sft(*overrides, f"out_dir={out}", "train.max_steps=1", f"train.seed={seed}")
        assert result.returncode == 0, result.stderr
        drawn[seed] = load_file(out / "final/adapter.safetensors")
        recipe = load_recipe(SFTRecipe, ROOT / "recipes/docstring-tiny.yaml", [*overrides, f"train.seed={seed}"])
        model = load_model(root / "base")
        torch.manual_seed(seed)
        apply_lora(model, recipe.lora)
        for name, layer in lora_layers(model).items():
            assert torch.equal(drawn[seed][f"{name}.lora_A"], layer.lora_A.detach()), name
    assert not torch.equal(drawn[1]["transformer.h.0.attn.c_attn.lora_A"], drawn[2]["transformer.h.0.attn.c_attn.lora_A"])


def test_an_adapter_finds_its_base_from_any_working_directory(setup, tmp_path):
    root, overrides = setup
    relative = [o for o in overrides if not o.startswith("base=")] + ["base=base"]  # as typed in root
    out = root / "relative-base"
    command = [sys.executable, str(ROOT / "finetune/sft.py"), str(ROOT / "recipes/docstring-tiny.yaml"), *relative,
               f"out_dir={out}", "train.max_steps=1"]
    trained = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=600)
    assert trained.returncode == 0, trained.stderr
    sampled = subprocess.run([sys.executable, "-m", "codegpt.finetune.sample", str(out / "final"), "--max-new-tokens", "2"],
                             capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert sampled.returncode == 0, sampled.stderr


def merge(*args):
    return subprocess.run([sys.executable, "-m", "codegpt.finetune.merge", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_merge_never_writes_over_the_base_or_what_the_user_did_not_ask_to(setup, tmp_path):
    root, overrides = setup
    adapter = root / "merge-target-source/final"
    assert sft(*overrides, f"out_dir={adapter.parent}", "train.max_steps=1").returncode == 0
    base_bytes = (root / "base/model.safetensors").read_bytes()
    for args in ([adapter, root / "base"], [adapter, root / "base", "--overwrite"], [adapter, adapter, "--overwrite"],
                 [adapter, root, "--overwrite"]):
        refused = merge(*args)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "never" in refused.stderr
    assert (root / "base/model.safetensors").read_bytes() == base_bytes and (adapter / "adapter.json").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    for flags in ([], ["--overwrite"]):  # --overwrite replaces a model directory, not any directory
        refused = merge(adapter, mine, *flags)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "notes.txt" in refused.stderr
    assert sorted(os.listdir(mine)) == ["notes.txt"]

    assert merge(adapter, tmp_path / "merged").returncode == 0
    again = merge(adapter, tmp_path / "merged")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    replaced = merge(adapter, tmp_path / "merged", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "model.safetensors"]


def test_an_infill_example_labels_only_the_middle_after_the_psm_prompt():
    tokenizer = Tokenizer()
    ids = tokenizer.special_ids
    inputs, labels = encode_example(tokenizer, "def f():\n", "    return 1\n", suffix="\nprint(f())\n")
    prompt = [ids["<|fim_prefix|>"], *tokenizer.encode("def f():\n"), ids["<|fim_suffix|>"],
              *tokenizer.encode("\nprint(f())\n"), ids["<|fim_middle|>"]]
    assert labels[len(prompt) - 1 :] == tokenizer.encode("    return 1\n") + [tokenizer.eot_id]
    assert labels[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
    assert inputs == (prompt + tokenizer.encode("    return 1\n"))


def test_the_docstring_task_in_infill_form_trains_an_adapter_that_says_it_infills(setup, tmp_path):
    root, overrides = setup
    out = root / "infill"
    result = sft(*overrides, f"out_dir={out}", "task.format=infill", "train.max_steps=2")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (root / "data/val.jsonl").read_text().splitlines()]
    assert all("suffix" in r for r in records) and any(r["suffix"].strip() for r in records)
    assert json.loads((out / "final/adapter.json").read_text())["fim"] is True
    model, _ = load_for_inference(out / "final")
    assert model.config.fim and not load_model(root / "base").config.fim
    report = tmp_path / "eval.json"
    evaluated = subprocess.run([sys.executable, "-m", "codegpt.finetune.evaluate", str(out / "final"), "--benchmark", "examples",
                                "--examples", str(root / "data/val.jsonl"), "--infill", "--limit", "2",
                                "--max-new-tokens", "8", "--out", str(report)], capture_output=True, text=True, cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "not trained for fill-in-the-middle" not in evaluated.stderr
    assert json.loads(report.read_text())["examples"] == 2
