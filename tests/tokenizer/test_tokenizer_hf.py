"""Tokenizers that checkpoints bring: GGUF vocabularies and tokenizer.json, against transformers and Meta."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from tokenizer_texts import SAMPLES
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from herd.tokenizer import ChatFormat, HFTokenizer, TemplateChatFormat, TokenizerError, chat_format_for, load_tokenizer
from herd.tokenizer.hf import BYTE_CHARS

SMOLLM2_TEXTS = [
    *SAMPLES,
    "spaces    between     words      and\t\t\ttabs\n\n\n\nnewlines",
    " " * 1000 + "x" + "\n" * 500,
    "numbers 1 12 123 1234 12345 2024-06-01 3.14 0x1F 1e10",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end<|im_end|><repo_name>",
    "class Foo:\n    def __init__(self):\n        self.x = {'a': [1, 2]}  # comment\n",
    "I'm sure you'll see they're here, we've done it, it's fine, she'd go, he's IN",
]


@pytest.mark.parametrize("text", SMOLLM2_TEXTS)
def test_gguf_tokenizer_matches_transformers(smollm2, smollm2_transformers, text):
    ids = smollm2.encode(text, allowed_special="all")
    assert ids == smollm2_transformers(text)["input_ids"]
    assert smollm2.decode(ids) == smollm2_transformers.decode(ids, skip_special_tokens=False) == text


# SmolLM2 splits numeric characters one by one before GPT-2's rule (its tokenizer.json: Digits then ByteLevel;
# llama.cpp's "smollm" pre-tokenizer), which transformers' GGUF import leaves out: these ids are llama.cpp's
# (llama-cpp-python 0.3.36, vocab_only, measured), where transformers gives [216, 216, 33, 34, 35], [104, 4636, ...]
# and [3351, 138]. Among 2,909 random strings herd and llama.cpp differed on 6, each around characters new in
# Unicode 16, whose categories the two libraries' tables do not share yet.
@pytest.mark.parametrize(("text", "ids"), [("  123", [256, 33, 34, 35]), ("x \u216b", [104, 216, 173, 223, 121]),
                                           (" \u00bd", [216, 16738]), (" \u0661\u0662", [216, 164, 111, 164, 112])])
def test_gguf_tokenizer_splits_numerals_as_llama_cpp_does(smollm2, text, ids):
    assert smollm2.encode(text) == ids and smollm2.decode(ids) == text


def test_gguf_tokenizer_attributes(smollm2):
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (49152, 1, 2, 2)
    assert not smollm2.add_bos  # the file says so: a plain encode starts with the text
    assert smollm2.encode("hi", bos=True) == smollm2.encode("hi", bos=False)
    assert smollm2.special_tokens["<|im_start|>"] == 1 and smollm2.special_tokens["<|im_end|>"] == 2
    assert len(smollm2.special_tokens) == 17  # the control tokens (token_type 3)
    assert 2 in smollm2.stop_ids and smollm2.special_tokens["<|endoftext|>"] in smollm2.stop_ids
    assert "<|im_start|>" in smollm2.chat_template
    assert smollm2.encode("x", bos=False, eos=True) == [smollm2.encode("x", bos=False)[0], 2]


def test_gguf_special_text_is_plain_unless_allowed(smollm2):
    text = "a<|im_end|>b<|im_start|>c"
    plain = smollm2.encode(text)
    assert not set(smollm2.special_tokens.values()) & set(plain)
    assert smollm2.decode(plain) == text
    assert 2 in smollm2.encode(text, allowed_special={"<|im_end|>"})
    assert 1 not in smollm2.encode(text, allowed_special={"<|im_end|>"})


def test_gguf_decode_bytes_and_invalid_utf8(smollm2):
    text = "😀 日本"
    ids = smollm2.encode(text)
    assert b"".join(smollm2.decode_bytes([i]) for i in ids) == text.encode()
    partial = smollm2.decode_bytes(ids[:1])
    assert partial == text.encode()[: len(partial)] and len(partial) < 4
    assert smollm2.decode(ids[:1]) == partial.decode("utf-8", errors="replace")


def test_gguf_token_to_id(smollm2):
    assert smollm2.token_to_id("<|im_end|>") == 2
    assert smollm2.token_to_id(" the") == smollm2.encode(" the")[0]
    assert smollm2.token_to_id("no such single token") is None


LLAMA3_SPECIAL_TEXT = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|python_tag|>x<|eom_id|>"


@pytest.mark.parametrize("text", [*SAMPLES, LLAMA3_SPECIAL_TEXT])
def test_llama3_gguf_matches_meta(llama3_gguf, meta_tokenizer, text):
    tok = llama3_gguf
    assert tok.encode(text) == meta_tokenizer.encode(text, bos=True, eos=False)
    assert tok.encode(text, allowed_special="all") == meta_tokenizer.encode(
        text, bos=True, eos=False, allowed_special="all"
    )
    assert tok.decode(tok.encode(text, bos=False)) == text


def test_llama3_gguf_attributes(llama3_gguf):
    tok = llama3_gguf
    assert tok.add_bos  # llama.cpp's default for Llama 3 vocabularies
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (128256, 128000, 128009, None)
    assert tok.stop_ids == {128001, 128008, 128009}
    assert tok.chat_template is None


def test_llama3_vocabulary_without_template_gets_llama3_chat_format(llama3_gguf, tokenizer):
    fmt = chat_format_for(llama3_gguf)
    assert isinstance(fmt, ChatFormat)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|eot_id|> there"}]
    assert fmt.encode_dialog(dialog) == ChatFormat(tokenizer).encode_dialog(dialog)
    reply = tokenizer.encode('<|python_tag|>brave_search.call(query="x")<|eom_id|>', bos=False, allowed_special="all")
    ours, llama3 = fmt.decode_assistant(reply), ChatFormat(tokenizer).decode_assistant(reply)
    assert ours["stop_reason"] == llama3["stop_reason"] == "end_of_message"
    assert [c["function"] for c in ours["tool_calls"]] == [c["function"] for c in llama3["tool_calls"]]


def test_llama30_vocabulary_chats_but_refuses_tool_calls(llama30_gguf, tokenizer):
    # Its chat format had failed with a bare KeyError '<|eom_id|>' at load.
    fmt = chat_format_for(llama30_gguf)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert fmt.encode_dialog(dialog) == ChatFormat(tokenizer).encode_dialog(dialog)
    assert fmt.decode_assistant(tokenizer.encode("Hello.", bos=False) + [128009])["stop_reason"] == "end_of_turn"
    call = {"id": "1", "type": "function", "function": {"name": "brave_search", "arguments": '{"query": "x"}'}}
    with pytest.raises(ValueError, match=r"no <\|python_tag\|> \(a Llama 3.0 vocabulary\)"):
        fmt.encode_message({"role": "assistant", "content": "", "tool_calls": [call]})


def test_tokenizer_json_without_side_files(tiny_json_dir):
    tok = load_tokenizer(tiny_json_dir / "tokenizer.json")
    # BOS is what the post-processor adds; EOS falls back to a known end marker.
    assert (tok.bos_id, tok.add_bos, tok.eos_id, tok.pad_id, tok.chat_template) == (256, True, 259, None, None)
    assert tok.encode("ab", eos=True) == [256, 97, 98, 259]
    assert tok.special_tokens == {"<s>": 256, "</s>": 257, "<pad>": 258, "<|im_end|>": 259}
    with pytest.raises(TokenizerError):
        chat_format_for(tok)


def test_tokenizer_json_side_files(tiny_json_dir):
    template = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    config = {"eos_token": {"content": "</s>"}, "pad_token": "<pad>", "add_bos_token": False, "chat_template": template}
    (tiny_json_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (tiny_json_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 259]}))
    tok = load_tokenizer(tiny_json_dir)
    assert (tok.bos_id, tok.add_bos, tok.eos_id, tok.pad_id, tok.chat_template) == (256, False, 257, 258, template)
    assert tok.stop_ids == {257, 259}
    assert tok.encode("ab") == [97, 98]
    fmt = chat_format_for(tok)
    assert isinstance(fmt, TemplateChatFormat)
    assert fmt.encode_dialog([{"role": "user", "content": "a"}]) == [97, 259]


def test_without_generation_config_the_models_config_says_where_to_stop(tiny_json_dir):
    """transformers (GenerationConfig.from_model_config) and vLLM stop at config.json's eos_token_id when no
    generation_config.json is there; herd had read only the latter and generated past the model's end."""
    from transformers import GenerationConfig, LlamaConfig

    (tiny_json_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    for eos in ([257, 258], 258, None):
        (tiny_json_dir / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": eos}))
        theirs = GenerationConfig.from_model_config(LlamaConfig.from_pretrained(tiny_json_dir)).eos_token_id
        theirs = {theirs} if isinstance(theirs, int) else set(theirs or ())
        assert load_tokenizer(tiny_json_dir).stop_ids == theirs | {257, 259}  # with eos_token and <|im_end|>
    (tiny_json_dir / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 258}))
    (tiny_json_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 256}))
    assert load_tokenizer(tiny_json_dir).stop_ids == {256, 257, 259}  # generation_config.json's, when there


def test_ids_left_unused_below_a_special_token_are_counted(tmp_path):
    """A special token placed at the model's last row, ids unused below it: herd.load had failed with an
    IndexError (its table sized by the count of tokens), and that token could never have been generated."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(BYTE_CHARS)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [{**AddedToken("<|eot_id|>", special=True).__getstate__(), "id": 299}]
    data["model"]["vocab"]["<|eot_id|>"] = 299
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    tok, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert tok.encode("hi<|eot_id|>", bos=False, allowed_special="all") == theirs("hi<|eot_id|>").input_ids
    assert (tok.vocab_size, tok.eos_id, tok.decode([104, 299])) == (300, 299, theirs.decode([104, 299]))


def test_named_chat_templates_and_jinja_files(tiny_json_dir):
    """The default and "tool_use" templates, as transformers reads them: its files (chat_template.jinja,
    additional_chat_templates/NAME.jinja) before tokenizer_config.json's; "tool_use" had been dropped."""
    from transformers import AutoTokenizer

    def templates() -> dict[str, str]:
        tok = load_tokenizer(tiny_json_dir)
        ours = {name: t for name, t in (("default", tok.chat_template), ("tool_use", tok.tool_use_template)) if t}
        theirs = AutoTokenizer.from_pretrained(tiny_json_dir).chat_template
        assert ours == (theirs if isinstance(theirs, dict) else {"default": theirs})
        return ours

    config = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tiny_json_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert templates() == {"default": "D", "tool_use": "T"}
    (tiny_json_dir / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert templates() == {"default": "{{ messages[0].content }}"}
    (tiny_json_dir / "additional_chat_templates").mkdir()
    (tiny_json_dir / "additional_chat_templates" / "tool_use.jinja").write_text("T2")
    assert templates() == {"default": "{{ messages[0].content }}", "tool_use": "T2"}
    (tiny_json_dir / "tokenizer_config.json").write_text("{}")
    assert templates() == {"default": "{{ messages[0].content }}", "tool_use": "T2"}


def test_lone_surrogates_become_replacement_characters(smollm2, llama3_gguf, meta_tokenizer):
    assert smollm2.encode("a\ud800b") == smollm2.encode("a\ufffdb")
    assert llama3_gguf.encode("x\udfffy") == meta_tokenizer.encode("x\udfffy", bos=True, eos=False)


def test_concurrent_encodes_keep_their_own_special_token_mode(smollm2):
    text = "a<|im_end|>b" * 50
    as_special, as_text = smollm2.encode(text, allowed_special="all"), smollm2.encode(text)
    assert as_special != as_text
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: smollm2.encode(text, allowed_special="all" if n % 2 else ()), range(200)))
    assert results == [as_special if n % 2 else as_text for n in range(200)]


def _sentencepiece_style(decoder) -> Tokenizer:
    """A Llama-2 / Mistral-style tokenizer.json: ▁ for spaces, byte fallback, a decoder that strips the text's start."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "▁Hello", "▁world", "!", "日本", "▁日本", "Hello", "world"]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoder
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


@pytest.mark.parametrize("decoder", [
    decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]),
    decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback()]),
], ids=["llama2", "metaspace"])
def test_sentencepiece_style_tokens_decode_as_they_continue_a_text(decoder):
    """Generation joins each token's bytes: they must add up to the tokenizer's decode of the whole text less the
    prompt's (what transformers' pipelines and vLLM return). Decoded one by one, every word had lost its space and
    each byte-fallback piece of a character had become U+FFFD ('HelloworldHello' for ' Hello world Hello')."""
    reference = _sentencepiece_style(decoder)
    herd_tok = HFTokenizer(reference, bos_id=1, eos_id=2)
    rng = random.Random(0)
    words = [[reference.token_to_id(p)] for p in ["▁Hello", "▁world", "!", "▁日本", "Hello", "a", "▁"]]
    characters = [[3 + b for b in c.encode()] for c in "é日🙂"]   # whole characters from byte-fallback pieces
    for _ in range(200):
        prompt = [1, *sum(rng.choices(words, k=rng.randint(1, 4)), [])]
        generated = sum(rng.choices(words + characters, k=rng.randint(1, 8)), [])
        expected = reference.decode(prompt + generated)[len(reference.decode(prompt)):]
        joined = b"".join(herd_tok.decode_bytes([i]) for i in generated).decode("utf-8", errors="replace")
        assert joined == expected
        assert herd_tok.decode(prompt + generated) == reference.decode(prompt + generated, skip_special_tokens=False)
