"""Missing or damaged tokenizer files fail with one clear line naming the file and what to do."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer, models

from herd.tokenizer import HFTokenizer, Llama3Tokenizer, TokenizerError, load_tokenizer


def load_error(path: Path, loader=load_tokenizer) -> str:
    with pytest.raises(TokenizerError) as caught:
        loader(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_is_a_value_error():
    assert issubclass(TokenizerError, ValueError)


def test_missing_file(tmp_path):
    message = load_error(tmp_path / "nope" / "tokenizer.model")
    assert "cannot read" in message and "tokenizer.model" in message


def test_not_a_bpe_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nthis is not base64!! 1\n")
    assert "line 2" in load_error(path)


def test_binary_garbage(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(bytes(range(256)) * 4)
    assert "not a tiktoken BPE file" in load_error(path)


def test_empty_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"")
    assert "empty" in load_error(path, Llama3Tokenizer)


def test_damaged_ranks(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 0\n")  # two tokens with rank 0
    assert "damaged" in load_error(path)


def test_directory_without_tokenizer(tmp_path):
    assert "neither tokenizer.json nor tokenizer.model" in load_error(tmp_path)


def test_missing_tokenizer_json(tmp_path):
    assert "not found" in load_error(tmp_path, HFTokenizer.from_file)


def test_corrupt_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    assert "not a valid Hugging Face tokenizer.json" in load_error(path)


def test_tokenizer_json_whose_merge_makes_no_token(tmp_path):
    # Valid JSON, a damaged vocabulary: tokenizers panics in Rust (an exception that is no Exception).
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(tmp_path / "tokenizer.json"))
    path = tmp_path / "tokenizer.json"
    path.write_text(path.read_text().replace('"ab":2', '"aX":2').replace('"ab": 2', '"aX": 2'))
    assert "not a valid Hugging Face tokenizer.json" in load_error(path)


def test_corrupt_tokenizer_config(tiny_json_dir):
    config = tiny_json_dir / "tokenizer_config.json"
    config.write_text("{not json")
    assert "unreadable JSON" in load_error(config, lambda _: load_tokenizer(tiny_json_dir))


def test_garbage_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    assert "not a readable GGUF" in load_error(path)


def write_gguf(path: Path, model: str, pre: str, merges=("a b",), eos: int | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(list(merges))
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_sentencepiece_vocabulary(tmp_path):
    message = load_error(write_gguf(tmp_path / "spm.gguf", "llama", "default"))
    assert "'llama'" in message and "tokenizer.json" in message


def test_gguf_with_unknown_pre_tokenizer(tmp_path):
    message = load_error(write_gguf(tmp_path / "odd.gguf", "gpt2", "mystery-bpe"))
    assert "'mystery-bpe'" in message


def test_minimal_gguf_loads(tmp_path):
    tok = load_tokenizer(write_gguf(tmp_path / "ok.gguf", "gpt2", "gpt2"))
    assert tok.encode("abab", bos=False) == [2, 2]


@pytest.mark.parametrize("merge, named", [("a c", "'a c'"), ("ab ", "``"), ("ab", "'ab'")])
def test_gguf_whose_merges_name_no_token(tmp_path, merge, named):
    # One damaged byte in a merge: its parts or its result are no tokens (tokenizers itself answers with a bare
    # Exception, a Rust panic or a TypeError).
    message = load_error(write_gguf(tmp_path / "bad.gguf", "gpt2", "gpt2", merges=["a b", merge]))
    assert "vocabulary is damaged" in message and named in message


def test_gguf_with_a_special_id_outside_the_vocabulary(tmp_path):
    # llama.cpp warns of a "bad special token" and goes on without it; such a BOS id would have reached the
    # model's embedding as an index out of range.
    tok = load_tokenizer(write_gguf(tmp_path / "odd.gguf", "gpt2", "gpt2", eos=70000))
    assert tok.eos_id is None and 70000 not in tok.stop_ids
