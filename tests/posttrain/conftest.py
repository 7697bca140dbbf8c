"""The tokenizers and chat formats post-training tests encode with."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import herd
from herd.checkpoint import save_checkpoint
from herd.tokenizer import HFTokenizer, chat_format_for
from herd.tokenizer.hf import BYTE_CHARS
from posttrain_helpers import ends_turns, tiny_model

# ChatML as SmolLM2 (the default model) writes it, default system prompt included.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def llama3_format():
    return herd.ChatFormat(herd.load_tokenizer())


@pytest.fixture(scope="session")
def chatml_format(tmp_path_factory):
    """A byte-level tokenizer with ChatML's special tokens and template (a checkpoint's own chat format)."""
    directory = tmp_path_factory.mktemp("chatml")
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(BYTE_CHARS)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return chat_format_for(HFTokenizer.from_file(directory))


@pytest.fixture(scope="session")
def base(tmp_path_factory, chatml_format):
    """A tiny checkpoint (the ChatML byte-level tokenizer) for the recipes to tune."""
    path = tmp_path_factory.mktemp("base") / "model"
    model = tiny_model(chatml_format.tokenizer.vocab_size)   # the engine samples only ids it can decode
    save_checkpoint((model.config, model.state_dict(), chatml_format.tokenizer), path, "meta")
    return path


@pytest.fixture(scope="session")
def ending_base(tmp_path_factory, chatml_format):
    """`base` made to end some of its replies within a few tokens, so rejection sampling keeps some."""
    path = tmp_path_factory.mktemp("ending_base") / "model"
    tokenizer = chatml_format.tokenizer
    model = ends_turns(tiny_model(tokenizer.vocab_size), tokenizer.special_tokens["<|im_end|>"])
    save_checkpoint((model.config, model.state_dict(), tokenizer), path, "meta")
    return path
