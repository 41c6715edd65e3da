"""Infilling from a prompt and a suffix: the PSM prompt, kept near the hole when too long; the
middle streamed like any completion; the command line's hole marker and its errors; the warning
for a model not trained for it."""

import pytest
import torch

from codegpt.base.checkpoint import save_model
from codegpt.base.generate import Sampling, generate, infill_ids, stream
from codegpt.base.model import GPT
from codegpt.base.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from tests.helpers import tiny_config
from codegpt.finetune import sample


def test_the_prompt_is_psm_and_keeps_the_code_nearest_the_hole(tokenizer):
    ids = tokenizer.special_ids
    before, after = tokenizer.encode("a = 1\nb = 2\n"), tokenizer.encode("\nprint(a + b)\n")
    assert infill_ids(tokenizer, "a = 1\nb = 2\n", "\nprint(a + b)\n", 100) == \
        [ids[FIM_PREFIX], *before, ids[FIM_SUFFIX], *after, ids[FIM_MIDDLE]]
    prefix, suffix = "x = 0\n" * 50, "y = 1\n" * 50
    short = infill_ids(tokenizer, prefix, suffix, 43)
    assert len(short) == 43
    kept_before = short[1 : short.index(ids[FIM_SUFFIX])]
    kept_after = short[short.index(ids[FIM_SUFFIX]) + 1 : -1]
    assert kept_before == tokenizer.encode(prefix)[-len(kept_before):]  # the prefix's end
    assert kept_after == tokenizer.encode(suffix)[: len(kept_after)]  # the suffix's start
    assert len(kept_after) == 20 and len(kept_before) == 20


def test_a_middle_streams_like_a_completion(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=100_352, block_size=64)).eval()
    sampling = Sampling(max_new_tokens=12, temperature=0)
    middle = generate(model, tokenizer, ["def f(x):\n"], sampling, ["\n    return y\n"])[0]
    assert "".join(piece for _, piece in stream(model, tokenizer, ["def f(x):\n"], sampling, ["\n    return y\n"])) == middle
    # Rows with and without a suffix in one batch: each as if alone.
    both = generate(model, tokenizer, ["def f(x):\n", "import os"], sampling, ["\n    return y\n", None])
    assert both == [middle, generate(model, tokenizer, ["import os"], sampling)[0]]


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model"
    save_model(path, GPT(tiny_config(vocab_size=100_352, block_size=64)))
    return path


def test_the_file_marks_the_hole_and_the_output_is_prefix_middle_suffix(plain_model, tmp_path, capsys):
    source = tmp_path / "hole.py"
    source.write_text("def add(a, b):\n<FILL-HERE>\nprint(add(1, 2))\n")
    sample.main([str(plain_model), "--file", str(source), "--temperature", "0", "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert out.startswith("def add(a, b):\n") and "\nprint(add(1, 2))\n" in out
    assert err.count("warning: this model was not trained for fill-in-the-middle") == 1


@pytest.mark.parametrize("text, problem", [("no hole here\n", "no hole marker <FILL-HERE>"),
                                           ("a\n<FILL-HERE>\nb\n<FILL-HERE>\n", ":4: a second hole marker")])
def test_a_missing_or_repeated_marker_is_one_line_naming_the_file(plain_model, tmp_path, capsys, text, problem):
    source = tmp_path / "hole.py"
    source.write_text(text)
    args = [str(plain_model), "--file", str(source)] + (["--suffix", "x"] if "no hole" in text else [])
    with pytest.raises(SystemExit) as stop:
        sample.main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and f"{source}" in err and problem in err
