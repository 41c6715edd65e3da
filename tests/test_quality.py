"""The sample-quality report: samples cut at their last complete line, parse or not; validation loss
over every held-out window."""

import json
import math

import numpy as np
import torch

from codegpt.base.model import GPT, GPTConfig
from codegpt.base.quality import complete_lines, parse_rate, parses, validation_loss
from codegpt.base.tokenizer import Tokenizer


def test_cut_and_parse():
    assert complete_lines("def f():\n    return 1\n    x = (") == "def f():\n    return 1\n"
    assert complete_lines("no newline") == ""
    assert parses("def f():\n    return 1\n") and not parses("def f(:\n") and not parses("")


def test_report_counts_its_samples():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    report = parse_rate(model, Tokenizer(), k=6, max_new_tokens=12)
    assert report["samples"] == 6 and len(report["texts"]) == 6
    assert report["parsable"] == sum(t["parses"] for t in report["texts"])
    assert all(t["parses"] == parses(t["text"] if not t["text"].startswith(" ") else "class C:\n" + t["text"])
               for t in report["texts"])


def test_validation_loss_covers_every_held_out_window_once(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    tokens = rng.integers(0, 512, 5 * 32 + 1 + 7, dtype="<u4")  # five windows of 32 (+1), and a tail
    tokens.tofile(shard_dir / "v.val.bin")
    (shard_dir / "index.json").write_text(json.dumps(
        {"splits": {"train": {"shards": []}, "val": {"shards": [{"file": "v.val.bin", "tokens": len(tokens)}]}}}))
    windows = torch.from_numpy(tokens[: 5 * 32 + 1].astype(np.int64))
    with torch.no_grad():
        per_window = [tiny_model(windows[i * 32 : i * 32 + 32][None], windows[i * 32 + 1 : i * 32 + 33][None]).item()
                      for i in range(5)]
    result = validation_loss(tiny_model, str(shard_dir), batch_size=2)  # batches of 2, 2 and 1
    assert result["tokens"] == 5 * 32
    assert abs(result["val_loss"] - sum(per_window) / 5) < 1e-5
    assert abs(result["perplexity"] - math.exp(result["val_loss"])) < 1e-6 * result["perplexity"]


def test_the_report_command_writes_its_json_and_replaces_only_its_own(tmp_path):
    from codegpt.base.checkpoint import save_model
    from codegpt.finetune.quality_report import main

    torch.manual_seed(0)
    save_model(tmp_path / "model", GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0)))
    out = tmp_path / "report.json"
    for seed in ("0", "1"):  # the second run replaces the first run's report
        main([str(tmp_path / "model"), "-k", "2", "--max-new-tokens", "4", "--seed", seed, "--json", str(out)])
        report = json.loads(out.read_text())
        assert report["samples"] == 2 and len(report["texts"]) == 2 and report["sampling"]["seed"] == int(seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.json"]
