"""The tokenizer travels with the weights: Meta's tokenizer.model becomes a tokenizer.json and a GGUF vocabulary
that encode exactly as tiktoken does, and HF tokenizer files are carried through Meta's format."""
from __future__ import annotations

import shutil

import pytest
import torch

import herd
from herd.checkpoint import Checkpoint, convert, expected_shapes, load_checkpoint, save_checkpoint
from herd.model.config import ModelConfig
from herd.tokenizer import chat_format_for

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
    # Meta's tiktoken file where Meta's Hugging Face repositories keep it: at the top, llama.cpp's converter read it
    # as a SentencePiece model and failed
    original = (meta_with_llama3_tokenizer / "tokenizer.model").read_bytes()
    assert (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer.model").exists()
    assert (hf_dir / "original" / "tokenizer.model").read_bytes() == original
    hf = load_checkpoint(hf_dir)
    assert isinstance(hf.tokenizer, HFTokenizer) and encodings(hf.tokenizer) == expected
    # transformers reads special-token text as the special token, as allowed_special="all" does.
    with_special = [meta.tokenizer.encode(t, bos=True, allowed_special="all") for t in TEXTS]
    auto = AutoTokenizer.from_pretrained(hf_dir)
    assert [auto(t)["input_ids"] for t in TEXTS] == with_special

    # The export carries Llama 3's chat template: transformers renders dialogs as herd's ChatFormat encodes them
    # (without one, apply_chat_template and vLLM had refused to chat), and herd reading it back keeps ChatFormat.
    fmt = herd.ChatFormat(meta.tokenizer)
    dialogs = [[{"role": "user", "content": "Hi"}],
               [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
               [{"role": "user", "content": "Run it"}, {"role": "assistant", "content": "Done."},
                {"role": "tool", "content": '{"ok": true}'}],
               [{"role": "user", "content": [{"type": "text", "text": "Hi."}, {"type": "text", "text": " How?"}]}]]
    for dialog in dialogs:
        rendered = auto.apply_chat_template(dialog, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert rendered == fmt.encode_dialog(dialog)
    assert isinstance(chat_format_for(hf.tokenizer), herd.ChatFormat)

    # HF files ride through Meta's format unchanged, and the tiktoken file goes back beside the weights there.
    meta2 = convert(hf_dir, tmp_path / "meta2", "meta")
    assert (meta2 / "tokenizer.model").read_bytes() == original
    back = convert(meta2, tmp_path / "hf2", "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "original/tokenizer.model"):
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes()
    assert not (back / "tokenizer.model").exists() and not (convert(hf_dir, tmp_path / "hf3", "hf") /
                                                           "tokenizer.model").exists()


@pytest.mark.heavy  # gguf-py parses the 400k vocabulary strings one by one: ~10 s
def test_meta_tokenizer_becomes_a_gguf_vocabulary(meta_with_llama3_tokenizer, tmp_path):
    from herd.tokenizer import HFTokenizer

    expected = encodings(load_checkpoint(meta_with_llama3_tokenizer).tokenizer)
    gguf_file = convert(meta_with_llama3_tokenizer, tmp_path / "m.gguf", "gguf", gguf_type="F32")
    g = load_checkpoint(gguf_file)
    assert isinstance(g.tokenizer, HFTokenizer) and encodings(g.tokenizer) == expected
    assert g.tokenizer.bos_id == 128000 and 128009 in g.tokenizer.stop_ids
    assert g.tokenizer.chat_template and isinstance(chat_format_for(g.tokenizer), herd.ChatFormat)


def test_a_gguf_written_from_hf_files_names_the_pre_tokenizer_llama_cpp_splits_with():
    """SmolLM2 cuts digits apart, then GPT-2's regex: llama.cpp calls that "smollm". Written as "default" (llama.cpp's
    own, which splits " (" in two and cleans spaces), a GGUF made from HF files had tokenized otherwise there."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from herd.checkpoint.vocab import gguf_tokenizer_fields
    from herd.llm import default_model_path
    from herd.tokenizer import HFTokenizer

    def pre_of(tok):
        config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, ffn_hidden_dim=64)
        fields = dict((key, value) for key, value, *_ in gguf_tokenizer_fields(Checkpoint(config, {}, tokenizer=tok)))
        return fields["tokenizer.ggml.pre"]

    smollm2 = load_checkpoint(default_model_path()).tokenizer
    assert pre_of(smollm2) == "smollm"
    plain = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert pre_of(HFTokenizer(plain, bos_id=None, eos_id=None)) == "gpt2"
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    assert pre_of(HFTokenizer(plain, bos_id=None, eos_id=None)) == "default"
