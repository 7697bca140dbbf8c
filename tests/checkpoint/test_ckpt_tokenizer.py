"""The tokenizer travels with the weights: Meta's tokenizer.model becomes a tokenizer.json and a GGUF vocabulary
that encode exactly as tiktoken does, and HF tokenizer files are carried through Meta's format."""
from __future__ import annotations

import shutil

import pytest
import torch

from herd.checkpoint import Checkpoint, convert, expected_shapes, load_checkpoint, save_checkpoint
from herd.model.config import ModelConfig

TEXTS = ["Hello, world!", "  déjà vu 12345 <|eot_id|> tabs\tand\nnewlines", "ümlaut 😀 emoji"]


@pytest.fixture(scope="module")
def meta_with_llama3_tokenizer(tmp_path_factory):
    from herd.tokenizer.llama3 import bundled_model_path

    tokenizer_model = bundled_model_path()
    if not tokenizer_model.is_file():
        pytest.skip("llama-models' tokenizer.model is not installed")
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=128256, ffn_hidden_dim=64, tie_embeddings=True)
    state = {name: torch.randn(shape).to(torch.bfloat16) for name, shape in expected_shapes(config).items()}
    directory = save_checkpoint(Checkpoint(config, state), tmp_path_factory.mktemp("m") / "meta", "meta")
    shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
    return directory


def encodings(tok):
    return [tok.encode(t, bos=True) for t in TEXTS]


def test_meta_tokenizer_becomes_hf(meta_with_llama3_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from herd.tokenizer import HFTokenizer, Llama3Tokenizer

    meta = load_checkpoint(meta_with_llama3_tokenizer)
    assert isinstance(meta.tokenizer, Llama3Tokenizer)
    expected = encodings(meta.tokenizer)

    hf_dir = convert(meta_with_llama3_tokenizer, tmp_path / "hf", "hf")
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "tokenizer.model").is_file()
    hf = load_checkpoint(hf_dir)
    assert isinstance(hf.tokenizer, HFTokenizer) and encodings(hf.tokenizer) == expected
    # transformers reads special-token text as the special token, as allowed_special="all" does.
    with_special = [meta.tokenizer.encode(t, bos=True, allowed_special="all") for t in TEXTS]
    auto = AutoTokenizer.from_pretrained(hf_dir)
    assert [auto(t)["input_ids"] for t in TEXTS] == with_special

    # HF files ride through Meta's format unchanged.
    back = convert(convert(hf_dir, tmp_path / "meta2", "meta"), tmp_path / "hf2", "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes()


@pytest.mark.heavy  # gguf-py parses the 400k vocabulary strings one by one: ~10 s
def test_meta_tokenizer_becomes_a_gguf_vocabulary(meta_with_llama3_tokenizer, tmp_path):
    from herd.tokenizer import HFTokenizer

    expected = encodings(load_checkpoint(meta_with_llama3_tokenizer).tokenizer)
    gguf_file = convert(meta_with_llama3_tokenizer, tmp_path / "m.gguf", "gguf", gguf_type="F32")
    g = load_checkpoint(gguf_file)
    assert isinstance(g.tokenizer, HFTokenizer) and encodings(g.tokenizer) == expected
    assert g.tokenizer.bos_id == 128000 and 128009 in g.tokenizer.stop_ids
