"""The sample-quality report: samples cut at their last complete line, parse or not."""

import torch

from base.model import GPT, GPTConfig
from base.quality import complete_lines, parse_rate, parses
from base.tokenizer import Tokenizer


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
