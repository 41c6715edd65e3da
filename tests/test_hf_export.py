"""The Hugging Face export as the tools that read it see it: AutoTokenizer's ids equal tiktoken's,
AutoModelForCausalLM and pipeline("text-generation") decode greedily what we decode, the ids our
sampler never draws stay undrawn there, and an export without transformers is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Everything here is read from local directories; nothing may be fetched from the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from codegpt.base.checkpoint import save_model  # noqa: E402
from codegpt.base.convert import GENERATION_CONFIG_FILE, export_hf  # noqa: E402
from codegpt.base.convert import main as convert_main  # noqa: E402
from codegpt.base.generate import Sampling, banned_ids, generate, token_steps  # noqa: E402
from codegpt.base.model import GPT, GPTConfig  # noqa: E402
from codegpt.base.tokenizer import (EOT, EOT_ID, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, PADDED_VOCAB_SIZE,  # noqa: E402
                                    Tokenizer)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def add(a, b):\n    return"
NEW_TOKENS = 16

# Code as the tokenizer meets it: non-ASCII identifiers and strings, emoji joined by ZWJ, runs of
# spaces, tabs and blank lines, trailing whitespace, CRLF, digit runs longer than 3 (which a
# literal conversion of tiktoken's pattern splits wrongly), contractions, and every special token.
SAMPLE = (
    "# -*- coding: utf-8 -*-\r\nclass Zähler:\n    \"\"\"Zählt 🦙🦙 und 😶\u200d🌫️ — «ok».\"\"\"\n\n\n"
    "    def __init__(self, n=1234567890):\n\tself.n = n  \t \n        self.s = 'naïve café' + \"日本語\"\n"
    "\n\n\n    \n  x = 3.14159 + 0x1F + 1_000_000 ; y = a'lL + I've + WE'RE\n"
    f"{EOT}{FIM_PREFIX}def f(x):{FIM_SUFFIX}    return y{FIM_MIDDLE}\n<|endofprompt|> <|endoftext <|fim_middle|x"
    "      \n\n   "
)


def padded_model(seed: int, **overrides) -> GPT:
    """A tiny model over the real, padded vocabulary, with weights large enough that greedy
    decoding does not repeat one token."""
    torch.manual_seed(seed)
    settings = dict(block_size=64, vocab_size=PADDED_VOCAB_SIZE, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = GPT(GPTConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(std=0.15)
    return model


def our_greedy_ids(model: GPT, tokenizer: Tokenizer, prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    """Our greedy decoding's ids, up to and including <|endoftext|>."""
    steps = token_steps(model, [tokenizer.encode(prompt)], Sampling(max_new_tokens=new_tokens, temperature=0),
                        banned_ids(model, tokenizer, "cpu"), tokenizer.eot_id)
    ids = []
    for _, (token,) in zip(range(new_tokens), steps):
        ids.append(token)
        if token == tokenizer.eot_id:
            break
    steps.close()
    return ids


def tempted(model: GPT, lures: dict[int, int], factor: float = 3.0) -> GPT:
    """`model` where id `lure` outscores id `target` wherever `target` has a positive logit (its
    head row is `factor` x the target's), and so wherever our greedy decoding picks `target`. An
    id our sampler never draws changes nothing of ours (nor is it ever an input); a tool that
    draws it picks it. The model is changed in place and returned."""
    with torch.no_grad():
        weight = model.transformer.wte.weight
        for lure, target in lures.items():
            weight[lure] = factor * weight[target]
    return model


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer):
    """A padded-vocabulary model whose greedy path would, but for the export's suppress_tokens,
    run into a padding id, a vocabulary gap and a fill-in-the-middle sentinel; its export; and
    our greedy ids, which end at <|endoftext|>."""
    # Each stage is a new model: a generation engine is kept per model, with the head it ranked.
    first = our_greedy_ids(padded_model(seed=0), tokenizer, PROMPT)
    # <|endoftext|> wins by the 6th step: ours stop there, and so must theirs.
    stop_lure = {EOT_ID: first[5]}
    ours = our_greedy_ids(tempted(padded_model(seed=0), stop_lure, factor=1.05), tokenizer, PROMPT)
    assert ours[-1] == EOT_ID and len(set(ours)) > 3, ours
    banned_lures = {PADDED_VOCAB_SIZE - 1: ours[0], 100256: ours[1], tokenizer.special_ids[FIM_MIDDLE]: ours[2]}
    model = tempted(tempted(padded_model(seed=0), stop_lure, factor=1.05), banned_lures)
    assert our_greedy_ids(model, tokenizer, PROMPT) == ours
    path = tmp_path_factory.mktemp("hf") / "export"
    export_hf(model, path)
    return model, path, ours


def test_hf_tokenizer_ids_and_text_equal_tiktokens(export, tokenizer):
    _, path, _ = export
    hf = transformers.AutoTokenizer.from_pretrained(path)
    # Special-token strings as text (our default) and as special tokens (allow_special).
    assert hf.encode(SAMPLE, add_special_tokens=False, split_special_tokens=True) == tokenizer.encode(SAMPLE)
    as_specials = tokenizer.encode(SAMPLE, allow_special=True)
    assert hf.encode(SAMPLE) == as_specials
    assert {i for i in as_specials if i >= EOT_ID} == {EOT_ID, *tokenizer.special_ids.values(), 100276}
    assert hf.decode(as_specials) == tokenizer.decode(as_specials) == SAMPLE
    assert hf.decode(tokenizer.encode("x = 1234567\n")) == "x = 1234567\n"
    assert (hf.eos_token, hf.eos_token_id, hf.bos_token_id) == (EOT, EOT_ID, EOT_ID)
    assert {t: hf.convert_tokens_to_ids(t) for t in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)} == {
        FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260}
    # Every id the tokenizer knows is one of tiktoken's; none is in the model's padding rows.
    assert max(hf.get_vocab().values()) == 100276 < tokenizer.vocab_size
    assert hf.model_max_length == 64


def test_auto_classes_and_pipeline_decode_our_greedy_tokens(export, tokenizer):
    model, path, ours = export
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    # The model's padded embedding, not the tokenizer's 100,277 ids.
    assert hf_model.config.vocab_size == PADDED_VOCAB_SIZE == hf_model.get_input_embeddings().num_embeddings
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompt = hf_tokenizer(PROMPT, return_tensors="pt")
    assert prompt.input_ids[0].tolist() == tokenizer.encode(PROMPT)
    with torch.no_grad():
        output = hf_model.generate(**prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
        unsuppressed = hf_model.generate(**prompt, do_sample=False, max_new_tokens=1, suppress_tokens=None)
    assert output[0, prompt.input_ids.shape[1]:].tolist() == ours
    # What the export's suppress_tokens prevents: the last padding row, lured to the first step.
    assert unsuppressed[0, -1].item() == PADDED_VOCAB_SIZE - 1

    pipe = transformers.pipeline("text-generation", model=str(path))
    text = pipe(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS, return_full_text=False)[0]["generated_text"]
    ours_text = generate(model, tokenizer, [PROMPT], Sampling(max_new_tokens=NEW_TOKENS, temperature=0))[0]
    assert text == ours_text == tokenizer.decode(ours[:-1])


def test_generation_config_starts_ends_and_suppresses_what_our_sampler_bans(export, tokenizer):
    model, path, _ = export
    document = json.loads((path / GENERATION_CONFIG_FILE).read_text())
    assert (document["bos_token_id"], document["eos_token_id"], document["pad_token_id"]) == (EOT_ID,) * 3
    assert (document["do_sample"], document["temperature"], document["top_k"]) == (True, Sampling.temperature, 0)
    assert document["max_new_tokens"] == Sampling.max_new_tokens
    suppressed = set(document["suppress_tokens"])
    assert suppressed == set(banned_ids(model, tokenizer, "cpu").nonzero().flatten().tolist())
    assert set(range(tokenizer.vocab_size, PADDED_VOCAB_SIZE)) | {100256, 100258, 100259, 100260} <= suppressed
    assert EOT_ID not in suppressed and 100276 not in suppressed
    assert transformers.GenerationConfig.from_pretrained(path).suppress_tokens == document["suppress_tokens"]


def test_a_model_over_part_of_the_vocabulary_exports_its_restriction(tmp_path, tokenizer, capsys):
    """A model trained over the ids its data holds (active_ids): GPT-2 has no such buffer, so the
    export leaves it out and suppresses the other ids when generating; greedy tokens stay ours."""
    active = torch.randperm(tokenizer.vocab_size, generator=torch.Generator().manual_seed(1))[:4096].sort().values

    def restricted():
        model = padded_model(seed=1, active_vocab=4096)
        with torch.no_grad():
            model.active_ids.copy_(active)
        return model

    # transformers tests 100,352 ids against the suppressed ones at every step: few steps here.
    ours = our_greedy_ids(restricted(), tokenizer, PROMPT, new_tokens=6)
    inactive = sorted(set(range(tokenizer.vocab_size)) - set(active.tolist()))
    model = tempted(restricted(), {inactive[0]: ours[0], inactive[1]: ours[1]})
    assert our_greedy_ids(model, tokenizer, PROMPT, new_tokens=6) == ours
    save_model(tmp_path / "ours", model)
    convert_main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"])
    printed = capsys.readouterr().out
    assert "trained over 4,096 of its 100,352 ids" in printed and "suppresses" in printed
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert "active_ids" not in hf_model.state_dict()
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        output = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=len(ours))
    assert output[0, prompt.shape[1]:].tolist() == ours


def test_a_vocabulary_smaller_than_the_tokenizer_exports_without_one(tmp_path, tiny_model, capsys):
    save_model(tmp_path / "ours", tiny_model)
    convert_main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"])
    assert "no tokenizer written: the model has 512 ids, fewer than cl100k_base's 100,277" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors"]


def test_export_without_transformers_is_one_line_and_writes_nothing(tmp_path):
    """transformers is not a dependency: the export imports it only for the tokenizer, and says
    how to install it before writing anything."""
    save_model(tmp_path / "ours", padded_model(seed=2, n_layer=1))
    # A `transformers` package that cannot be imported, first on the path.
    (tmp_path / "shadow/transformers").mkdir(parents=True)
    (tmp_path / "shadow/transformers/__init__.py").write_text("raise ImportError('transformers hidden by the test')\n")
    path = [str(tmp_path / "shadow"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run([sys.executable, "-m", "codegpt.base.convert", str(tmp_path / "ours"),
                             str(tmp_path / "hf"), "--to", "hf"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: the Hugging Face export writes the tokenizer with transformers' converter: "
                                    "pip install 'transformers>=4.46'")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ours", "shadow"]
