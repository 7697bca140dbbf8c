"""Tokenizers travelling with checkpoints: read each format's, and write one in the layout of another.

Three shapes of vocabulary meet here: Meta's tiktoken `tokenizer.model` (ranks of byte strings), Hugging Face's
`tokenizer.json`, and a GGUF's `tokenizer.ggml.*` lists. Both of the latter spell bytes GPT-2's way and list merges;
tiktoken has no merge list, so one is recovered from the ranks (as transformers' TikTokenConverter does).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from gguf import GGUFValueType

# Files that make up a tokenizer in a checkpoint directory, copied as they are between directory formats.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
TEMPLATES_DIR = "additional_chat_templates"
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp token types


# ---------------------------------------------------------------- reading


def load_dir_tokenizer(directory: Path, prefer: str) -> tuple[object | None, str | None]:
    """The tokenizer a checkpoint directory brings, and a note when it has none we can use.

    A missing or unusable tokenizer does not stop the weights from loading (or converting): it is noted instead.
    """
    order = [prefer] + [n for n in ("tokenizer.model", "tokenizer.json") if n != prefer]
    found = [directory / n for n in order if (directory / n).is_file()]
    if not found:
        return None, "no tokenizer.model or tokenizer.json beside the weights"
    from herd.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(found[0]), None
    except TokenizerError as e:
        return None, str(e)


def gguf_tokenizer(reader) -> tuple[object | None, str | None]:
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None, "the GGUF embeds no vocabulary"
    from herd.tokenizer import HFTokenizer, TokenizerError

    try:
        return HFTokenizer.from_gguf(reader), None
    except TokenizerError as e:  # its message names the file, which the note's reader names already
        return None, str(e).removeprefix(f"{getattr(reader.data, 'filename', '')}: ")


# ---------------------------------------------------------------- directory formats


def write_tokenizer(ckpt, directory: Path, fmt: str) -> None:
    """Put the checkpoint's tokenizer into `directory` (a Meta or HF checkpoint being written).

    Files are copied when the source is a directory; otherwise (GGUF) the vocabulary is written as tokenizer.json.
    For an HF target with only Meta's tokenizer.model, a tokenizer.json is derived from it too. Meta's tiktoken
    tokenizer.model goes where each layout keeps it: beside the weights in Meta's, under original/ in Hugging Face's
    (at the top, llama.cpp's converter read it as SentencePiece's and failed on every Llama 3 model herd wrote).
    """
    source = ckpt.source if ckpt.source is not None and Path(ckpt.source).is_dir() else None
    if source is not None:
        for name in TOKENIZER_FILES:
            found = source / name
            if name == "tokenizer.model" and not found.is_file():
                found = source / TIKTOKEN_IN_HF
            if found.is_file():
                target = directory / name
                if name == "tokenizer.model" and _is_tiktoken(found):
                    target = tiktoken_path(directory, fmt)
                    target.parent.mkdir(exist_ok=True)
                shutil.copyfile(found, target)
        if (source / TEMPLATES_DIR).is_dir():   # named chat templates beside chat_template.jinja ("tool_use")
            shutil.copytree(source / TEMPLATES_DIR, directory / TEMPLATES_DIR, dirs_exist_ok=True)
    tok = ckpt.tokenizer
    if tok is None or (directory / "tokenizer.json").is_file():
        return
    model_path = getattr(tok, "path", None)  # a Llama3Tokenizer's tokenizer.model
    if model_path is not None:
        target = tiktoken_path(directory, fmt)
        if not target.is_file():
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(model_path, target)
        if fmt == "hf":
            _write_hf_files(_llama3_tokenizer_json(tok), tok, directory)
    elif getattr(tok, "_tokenizer", None) is not None:  # an HFTokenizer, here from a GGUF's vocabulary
        _write_hf_files(_with_bos(tok), tok, directory)


TIKTOKEN_IN_HF = Path("original") / "tokenizer.model"  # as Meta's Hugging Face repositories keep it


def tiktoken_path(directory: Path, fmt: str) -> Path:
    return directory / (TIKTOKEN_IN_HF if fmt == "hf" else "tokenizer.model")


def _is_tiktoken(path: Path) -> bool:
    """Meta's tiktoken ranks (lines of base64 and a number), not a SentencePiece model (Llama 2's, which Hugging Face
    layouts keep at the top)."""
    with open(path, "rb") as fh:
        first = fh.readline(4096)
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first) is not None


def _write_hf_files(tokenizer, tok, directory: Path) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))

    def content(i):
        return tokenizer.id_to_token(i) if i is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": content(tok.bos_id),
        "eos_token": content(tok.eos_id),
        "pad_token": content(getattr(tok, "pad_id", None)),
        "add_bos_token": bool(getattr(tok, "add_bos", True)),
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if template := chat_template(tok):
        tool_use = getattr(tok, "tool_use_template", None)
        named = [{"name": "default", "template": template}, {"name": "tool_use", "template": tool_use}]
        config["chat_template"] = named if tool_use else template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                          encoding="utf-8")
    stops = sorted(getattr(tok, "stop_ids", ()) or ([tok.eos_id] if tok.eos_id is not None else []))
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def chat_template(tok) -> str | None:
    """The Jinja chat template an exported tokenizer carries: its own, or Llama 3's for Meta's tokenizer."""
    if template := getattr(tok, "chat_template", None):
        return template
    from herd.tokenizer.chat_format import LLAMA3_CHAT_TEMPLATE

    return LLAMA3_CHAT_TEMPLATE if getattr(tok, "path", None) is not None else None


def _with_bos(tok):
    """The HFTokenizer's tokenizers.Tokenizer, with a post-processor adding BOS as transformers expects."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_str(tok._tokenizer.to_str())
    if tok.add_bos and tok.bos_id is not None and tokenizer.post_processor is None:
        bos = tokenizer.id_to_token(tok.bos_id)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)]
        )
    return tokenizer


# ---------------------------------------------------------------- tiktoken → byte-level BPE


def llama3_vocab(tok) -> tuple[list[str], list[str], list[int]]:
    """Tokens (GPT-2 byte spelling), merges ("a b") and llama.cpp token types of a Llama3Tokenizer."""
    from herd.tokenizer.hf import BYTE_CHARS

    ranks = tok.ranks

    def spell(b: bytes) -> str:
        return "".join(BYTE_CHARS[x] for x in b)

    tokens = [""] * len(ranks)
    for token, rank in ranks.items():
        tokens[rank] = spell(token)
    merges = []
    for token, rank in ranks.items():
        # Every split of a token into two tokens is a merge producing it, ordered by the ranks of its parts.
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
        merges += [(rank, f"{spell(a)} {spell(b)}") for a, b in splits]
    merges.sort(key=lambda m: m[0])
    types = [_NORMAL] * len(tokens)
    for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        tokens.append(name)
        types.append(_CONTROL)
        assert len(tokens) == i + 1, "special tokens follow the ranks"
    return tokens, [m for _, m in merges], types


def _llama3_tokenizer_json(tok):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from herd.tokenizer.llama3 import SPLIT_PATTERN

    tokens, merges, types = llama3_vocab(tok)
    n_ranks = types.index(_CONTROL)
    tokenizer = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens[:n_ranks])},
            merges=[tuple(m.split(" ", 1)) for m in merges],
            ignore_merges=True,  # tiktoken takes a piece that is a whole vocabulary entry as is
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[n_ranks:]])
    bos = tokens[tok.bos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)]
    )
    return tokenizer


# ---------------------------------------------------------------- GGUF metadata


def gguf_tokenizer_fields(ckpt) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """tokenizer.* key/values for a GGUF being written: copied from a GGUF source, else built from the tokenizer."""
    if ckpt.format == "gguf" and ckpt.source is not None:
        from herd.checkpoint.gguf import open_reader

        reader = open_reader(Path(ckpt.source))
        out = []
        for key, f in reader.fields.items():
            if key.startswith("tokenizer."):
                array = f.types[0] == GGUFValueType.ARRAY
                out.append((key, f.contents(), f.types[0], f.types[-1] if array else None))
        return out
    tok = ckpt.tokenizer
    if tok is None:
        return []
    if getattr(tok, "path", None) is not None:
        tokens, merges, types = llama3_vocab(tok)
        pre = "llama-bpe"
    elif getattr(tok, "_tokenizer", None) is not None:
        tokens, merges, types, pre = _hf_vocab(tok._tokenizer.to_str())
    else:
        return []
    vocab_size = ckpt.config.vocab_size
    for i in range(len(tokens), vocab_size):  # llama.cpp wants one entry per embedding row
        tokens.append(f"[PAD{i}]")
        types.append(_UNUSED)
    out = [
        ("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING, None),
        ("tokenizer.ggml.pre", pre, GGUFValueType.STRING, None),
        ("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        ("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        ("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
        ("tokenizer.ggml.add_bos_token", bool(getattr(tok, "add_bos", True)), GGUFValueType.BOOL, None),
    ]
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", getattr(tok, "pad_id", None))):
        if value is not None:
            out.append((f"tokenizer.ggml.{key}_token_id", int(value), GGUFValueType.UINT32, None))
    special = getattr(tok, "special_tokens", {})
    for key, name in (("eot", "<|eot_id|>"), ("eom", "<|eom_id|>")):
        if name in special:
            out.append((f"tokenizer.ggml.{key}_token_id", int(special[name]), GGUFValueType.UINT32, None))
    if template := chat_template(tok):
        out.append(("tokenizer.chat_template", template, GGUFValueType.STRING, None))
    if tool_use := getattr(tok, "tool_use_template", None):
        out.append(("tokenizer.chat_template.tool_use", tool_use, GGUFValueType.STRING, None))
    return out


def _hf_vocab(tokenizer_json: str) -> tuple[list[str], list[str], list[int], str]:
    from herd.tokenizer.llama3 import SPLIT_PATTERN

    spec = json.loads(tokenizer_json)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"a {model.get('type')} tokenizer cannot be written to GGUF here; only byte-level BPE")
    vocab = dict(model["vocab"])
    types_by_id = {i: _NORMAL for i in vocab.values()}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        types_by_id[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, types_by_id[i]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    llama3 = json.dumps(SPLIT_PATTERN)[1:-1] in tokenizer_json   # the pattern appears JSON-escaped in the file
    pre = "llama-bpe" if llama3 else _llama_cpp_pre(spec.get("pre_tokenizer"))
    return tokens, merges, types, pre


def _llama_cpp_pre(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer. Its "default" cuts text otherwise than GPT-2's regex (" ("
    is two pieces there), so SmolLM2's digits-then-GPT-2 had come back from llama.cpp as other ids."""
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [(step.get("type"), step.get("individual_digits", step.get("use_regex"))) for step in steps]
    if kinds == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    return "gpt2" if kinds == [("ByteLevel", True)] else "default"
