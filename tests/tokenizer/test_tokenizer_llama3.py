"""The Llama 3 tokenizer against Meta's reference (llama_models.llama3.tokenizer.Tokenizer)."""

from __future__ import annotations

import pytest
from tokenizer_texts import SAMPLES

from herd.tokenizer import Llama3Tokenizer, load_tokenizer
from herd.tokenizer.llama3 import bundled_model_path

SPECIAL_TEXT = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    'tool says <|python_tag|>brave_search.call(query="x")<|eom_id|> then <|end_of_text|>',
    "reserved <|reserved_special_token_0|><|reserved_special_token_245|> and <|image|><|step_id|>",
    "almost special: <|eot_id| <eot_id|> <|EOT_ID|> <|reserved_special_token_246|>",
]

# Longer than tiktoken can take in one piece: the reference cuts these into slices, and so must we.
PATHOLOGICAL = {
    "a*500k": "a" * 500_000,
    "space*300k": " " * 300_000,
    "newline*60k": "\n" * 60_000,
    "runs straddling the 400k cut": "x" * 390_000 + " " * 30_000 + "y" * 40_000,
    "alternating long runs": ("ab " * 10 + "x" * 30_000 + " " * 30_000) * 4,
    "emoji*100k": "😀" * 100_000,
    "text then a run": "Normal words here. " * 1000 + "z" * 80_000,
}


def test_special_tokens_are_metas(tokenizer, meta_tokenizer):
    assert tokenizer.special_tokens == meta_tokenizer.special_tokens
    assert len(tokenizer.special_tokens) == 256
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|step_id|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|image|>": 128011,
        "<|reserved_special_token_245|>": 128255,
    }
    assert {t: tokenizer.special_tokens[t] for t in expected} == expected
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        128256,
        128000,
        128001,
        128004,
    )
    assert tokenizer.stop_ids == {128001, 128008, 128009}
    assert tokenizer.chat_template is None


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_reference_and_round_trips(tokenizer, meta_tokenizer, text):
    for bos, eos in [(True, False), (False, False), (True, True)]:
        assert tokenizer.encode(text, bos=bos, eos=eos) == meta_tokenizer.encode(text, bos=bos, eos=eos)
    assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text


@pytest.mark.parametrize("text", SPECIAL_TEXT)
def test_special_token_text(tokenizer, meta_tokenizer, text):
    specials = set(tokenizer.special_tokens.values())
    as_special = tokenizer.encode(text, bos=False, allowed_special="all")
    assert as_special == meta_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    # Not allowed: the same text, encoded as the plain text it is; the reference's default does the same.
    as_text = tokenizer.encode(text, bos=False)
    assert as_text == meta_tokenizer.encode(text, bos=False, eos=False)
    assert not specials & set(as_text)
    assert tokenizer.decode(as_text) == tokenizer.decode(as_special) == text


def test_allowing_some_special_tokens(tokenizer, meta_tokenizer):
    text = "a<|eot_id|>b<|eom_id|>c"
    ids = tokenizer.encode(text, bos=False, allowed_special={"<|eot_id|>"})
    assert ids == meta_tokenizer.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert 128009 in ids and 128008 not in ids


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_pathological_inputs_match_reference(tokenizer, meta_tokenizer, name):
    text = PATHOLOGICAL[name]
    ids = tokenizer.encode(text, bos=False)
    assert ids == meta_tokenizer.encode(text, bos=False, eos=False)
    assert tokenizer.decode(ids) == text


def test_decode_replaces_invalid_utf8_like_bytes_decode(tokenizer):
    smile = tokenizer.encode("😀", bos=False)
    assert len(smile) > 1  # the emoji is split across byte-level tokens
    partial = tokenizer.decode_bytes(smile[:-1])
    assert partial == "😀".encode()[: len(partial)]
    assert tokenizer.decode(smile[:-1]) == partial.decode("utf-8", errors="replace")
    assert "\ufffd" in tokenizer.decode(smile[:-1])


def test_decode_bytes_streams_back_to_the_text(tokenizer):
    text = "Stream: 日本 😀 ok"
    ids = tokenizer.encode(text, bos=False)
    assert b"".join(tokenizer.decode_bytes([i]) for i in ids) == text.encode()


def test_decode_shows_special_tokens(tokenizer):
    assert tokenizer.decode([128000, 9906, 128009]) == "<|begin_of_text|>Hello<|eot_id|>"


def test_token_to_id(tokenizer):
    assert tokenizer.token_to_id("<|eot_id|>") == 128009
    assert tokenizer.token_to_id("Hello") == tokenizer.encode("Hello", bos=False)[0]
    assert tokenizer.token_to_id("not one token at all") is None


def test_user_file_gives_the_same_tokenizer(tmp_path, tokenizer):
    copy = tmp_path / "tokenizer.model"
    copy.write_bytes(bundled_model_path().read_bytes())
    for tok in (load_tokenizer(copy), load_tokenizer(tmp_path)):
        assert isinstance(tok, Llama3Tokenizer)
        assert tok.encode(SAMPLES[1]) == tokenizer.encode(SAMPLES[1])


def test_default_is_loaded_once():
    assert load_tokenizer() is load_tokenizer()


def test_lone_surrogates_match_reference(tokenizer, meta_tokenizer):
    text = "a\ud800b \udc00"
    assert tokenizer.encode(text) == meta_tokenizer.encode(text, bos=True, eos=False)
