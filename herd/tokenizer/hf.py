"""Tokenizers that checkpoints bring along: a Hugging Face `tokenizer.json`, or a GGUF's vocabulary.

Both become a `tokenizers.Tokenizer` behind the same interface as `Llama3Tokenizer`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from herd.tokenizer import TokenizerError
from herd.tokenizer.llama3 import SPLIT_PATTERN as LLAMA3_SPLIT_PATTERN

if TYPE_CHECKING:
    from herd.gguf_file import GGUFFile

# Tokens that end a text or a turn in the vocabularies we know; generation stops on any of them.
# The end-of-text ones come first: they stand in for EOS when a checkpoint names none.
END_MARKERS = ("<|end_of_text|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")

_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre names (llama.cpp's) by the pre-tokenizer family they stand for.
_LLAMA3_PRE = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}
_DIGITS_THEN_GPT2_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"gpt2", "default"}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _built(build: Callable[[], Tokenizer], error: Callable[[str], str]) -> Tokenizer:
    """build(), its failures a TokenizerError of error(reason). tokenizers fails on a damaged vocabulary with a
    bare Exception or with a Rust panic, which is no Exception and prints its backtrace on stderr: what is printed
    meanwhile is held back, and shown only if no panic came."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold back
        saved = None
    held = tempfile.TemporaryFile()
    if saved is not None:
        os.dup2(held.fileno(), 2)
    panicked = False
    try:
        return build()
    except BaseException as e:
        panicked = type(e).__name__ == "PanicException"
        if not (panicked or isinstance(e, Exception)):
            raise
        raise TokenizerError(error(str(e).splitlines()[0] if str(e) else type(e).__name__)) from None
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
            if not panicked:
                held.seek(0)
                os.write(2, held.read())
        held.close()


def _byte_alphabet() -> list[str]:
    """GPT-2's spelling of bytes as printable characters: byte b is written as the b-th character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = (b for b in range(256) if b not in printable)
    spelled = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(unprintable)}
    return [spelled[b] for b in range(256)]


BYTE_CHARS = _byte_alphabet()
# Turns a spelled token into its bytes as Latin-1 text; other characters land outside Latin-1, so encoding fails.
_TO_LATIN1 = dict.fromkeys(range(256), 0xFFFF) | {ord(c): b for b, c in enumerate(BYTE_CHARS)}


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the interface of `Llama3Tokenizer`.

    Build one with `from_file` (tokenizer.json) or `from_gguf` (a GGUF's embedded vocabulary).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        add_bos: bool = True,
        chat_template: str | None = None,
        tool_use_template: str | None = None,
        stop_ids: Iterable[int] = (),
    ):
        self._tokenizer = tokenizer
        # Guards the tokenizer's encode_special_tokens switch, which each encode sets for itself.
        self._encode_lock = threading.Lock()
        added = tokenizer.get_added_tokens_decoder()
        self._added = {t.content: i for i, t in added.items()}
        self.special_tokens: dict[str, int] = {t.content: i for i, t in added.items() if t.special}
        self.vocab_size = _id_count(tokenizer)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.tool_use_template = tool_use_template  # the checkpoint's template for a dialog with tools, if it has one
        markers = {self.special_tokens[t] for t in END_MARKERS if t in self.special_tokens}
        self.stop_ids = frozenset({*stop_ids, *markers, *([eos_id] if eos_id is not None else [])})
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._token_bytes = (_token_bytes_table(tokenizer, self._added.keys()) if self._byte_level
                             else _token_bytes_in_context(tokenizer))

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """A Hugging Face `tokenizer.json` (or a directory holding one), with the `tokenizer_config.json`,
        `chat_template.jinja`, `additional_chat_templates/` and `generation_config.json` (else config.json's
        eos_token_id) beside it when present."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found; pass a tokenizer.json or the directory holding it")
        tokenizer = _built(lambda: Tokenizer.from_file(str(path)), lambda reason: (
            f"{path}: not a valid Hugging Face tokenizer.json ({reason}); re-download the checkpoint's tokenizer"))
        config = _read_json(path.parent / "tokenizer_config.json")
        generation = _read_json(path.parent / "generation_config.json")
        if not (path.parent / "generation_config.json").is_file():
            # transformers and vLLM then stop where the model's config.json says (GenerationConfig.from_model_config)
            generation = {"eos_token_id": _read_json(path.parent / "config.json").get("eos_token_id")}

        def token_id(name: str) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            return tokenizer.token_to_id(token) if isinstance(token, str) else None

        # The post-processor is what adds BOS when transformers encodes with special tokens.
        prefix = tokenizer.encode("", add_special_tokens=True).ids
        bos_id = token_id("bos_token")
        if bos_id is None and prefix:
            bos_id = prefix[0]
        eos_id = token_id("eos_token")
        if eos_id is None:
            eos_id = next((tokenizer.token_to_id(t) for t in END_MARKERS if tokenizer.token_to_id(t) is not None), None)
        generation_eos = generation.get("eos_token_id")
        templates = _chat_templates(config, path.parent)
        return cls(
            tokenizer,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=token_id("pad_token"),
            add_bos=config.get("add_bos_token", bool(prefix) and prefix[0] == bos_id),
            chat_template=templates.get("default"),
            tool_use_template=templates.get("tool_use"),
            stop_ids=[i for i in (generation_eos if isinstance(generation_eos, list) else [generation_eos])
                      if isinstance(i, int) and not isinstance(i, bool) and i >= 0],
        )

    @classmethod
    def from_gguf(cls, reader: GGUFFile) -> HFTokenizer:
        """The tokenizer embedded in a GGUF's metadata (llama.cpp's "gpt2" byte-level BPE vocabularies)."""
        where = getattr(reader.data, "filename", "GGUF file")

        def field(key: str, default: Any = None) -> Any:
            found = reader.fields.get(key)
            return found.contents() if found is not None else default

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"{where}: tokenizer.ggml.model is {kind!r}, but only 'gpt2' (byte-level BPE) vocabularies are "
                "supported; use the checkpoint's tokenizer.json instead"
            )
        tokens: list[str] = field("tokenizer.ggml.tokens")
        merges: list[str] = field("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise TokenizerError(f"{where}: the GGUF lacks tokenizer.ggml.tokens or .merges; re-convert the model")
        pre = field("tokenizer.ggml.pre", "default")
        llama3_family = pre in _LLAMA3_PRE
        vocab = {token: i for i, token in enumerate(tokens)}

        def damaged(reason: str) -> str:
            return f"{where}: the GGUF's vocabulary is damaged ({reason}); download or convert the model again"

        # Named here, where tokenizers would only say where in its own code it failed.
        bad = next((m for m in merges if " " not in m or m.replace(" ", "", 1) not in vocab), None)
        if bad is not None:
            raise TokenizerError(damaged(f"the merge {bad!r} is not two pieces that make one of its tokens"))
        tokenizer = _built(lambda: Tokenizer(models.BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            # tiktoken, which made these vocabularies, takes a piece that is a whole entry as is; llama.cpp does so
            # for llama3, llama-bpe, llama-v3 and falcon3, not smaug-bpe or dbrx (26 of 1,397 texts differ there).
            ignore_merges=llama3_family,
        )), damaged)
        tokenizer.pre_tokenizer = _gguf_pre_tokenizer(pre, where)
        tokenizer.decoder = decoders.ByteLevel()
        types = field("tokenizer.ggml.token_type", [])
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
        )
        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
        )
        # An id outside the vocabulary is taken as none, as llama.cpp takes it ("bad special token").
        ids = {k: i if isinstance(i := field(f"tokenizer.ggml.{k}_token_id"), int) and 0 <= i < len(tokens) else None
               for k in ("bos", "eos", "padding", "eot", "eom")}
        return cls(
            tokenizer,
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            pad_id=ids["padding"],
            # llama.cpp's defaults when the file does not say.
            add_bos=field("tokenizer.ggml.add_bos_token", llama3_family),
            chat_template=field("tokenizer.chat_template"),
            tool_use_template=field("tokenizer.chat_template.tool_use"),  # where llama.cpp keeps it
            stop_ids=[ids[k] for k in ("eot", "eom") if ids[k] is not None],
        )

    def encode(
        self,
        text: str,
        bos: bool = True,
        eos: bool = False,
        allowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Token ids for `text`.

        `bos` prepends BOS only for checkpoints that use one (`add_bos`). Special-token text becomes its
        special id only when allowed by `allowed_special` ("all" or a set of token strings); otherwise it
        is encoded as the plain text it is (never an error).
        """
        try:
            text.encode()
        except UnicodeEncodeError:  # lone surrogates: become U+FFFD, as tiktoken does, rather than fail
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = [self.bos_id] if bos and self.add_bos else []
        if allowed_special == "all":
            ids += self._encode(text, specials=True)
        else:
            allowed = [t for t in allowed_special if t in self.special_tokens]
            pieces = re.split(f"({'|'.join(map(re.escape, allowed))})", text) if allowed else [text]
            for n, piece in enumerate(pieces):
                if n % 2:
                    ids.append(self.special_tokens[piece])
                elif piece:
                    ids += self._encode(piece, specials=False)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode(self, text: str, specials: bool) -> list[int]:
        """`text`'s ids, with special-token text read as special tokens or as plain text."""
        with self._encode_lock:
            self._tokenizer.encode_special_tokens = not specials
            try:
                return self._tokenizer.encode(text, add_special_tokens=False).ids
            finally:  # leave the shared tokenizer as tokenizers made it
                self._tokenizer.encode_special_tokens = False

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` as the tokenizer's decoder gives it; bytes that are not valid UTF-8 become U+FFFD."""
        if self._byte_level:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids` as they continue a text, which may end inside a UTF-8 character (for streaming).

        Generation joins these token by token, so a SentencePiece-style vocabulary keeps the space its decoder strips
        at a text's start (" world" after a prompt, as vLLM and transformers' pipelines return it)."""
        return b"".join(self._token_bytes[i] for i in ids)

    def token_to_id(self, token: str) -> int | None:
        """The id of a special or added token, or of text that is exactly one vocabulary entry; None otherwise."""
        if token in self._added:
            return self._added[token]
        if self._byte_level:
            token = "".join(BYTE_CHARS[b] for b in token.encode())
        return self._tokenizer.token_to_id(token)


def _id_count(tokenizer: Tokenizer) -> int:
    """The highest id + 1: a vocabulary may leave ids unused below a special token (one placed at the model's last
    row), where the count of its tokens would cut that token off."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def _token_bytes_table(tokenizer: Tokenizer, added: Collection[str]) -> list[bytes]:
    """Each id's bytes: added tokens are their text, vocabulary entries are spelled in the byte alphabet.

    As tokenizers' ByteLevel decoder, a token with any character outside the alphabet stands for its own text.
    """
    table = [b""] * _id_count(tokenizer)
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        try:
            table[i] = token.encode() if token in added else token.translate(_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:
            table[i] = token.encode()
    return table


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes_in_context(tokenizer: Tokenizer) -> list[bytes]:
    """Each id's bytes after other text, for vocabularies whose decoder is not byte-level (SentencePiece-style:
    Llama 2, Mistral, TinyLlama). Decoded alone, every token had lost its leading space (the decoder strips one at a
    text's start) and each byte-fallback piece of a character had become U+FFFD; so each id is decoded after an
    anchor token and the anchor's text taken off, and a byte-fallback token `<0xNN>` is its byte."""
    n = _id_count(tokenizer)
    anchor = next((i for c in "aeiouxyz0123456789" if (i := tokenizer.token_to_id(c)) is not None), None)
    if anchor is None:   # no single-letter token to stand before the others: each id as its decoder gives it alone
        return [text.encode() for text in tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)]
    prefix = tokenizer.decode([anchor], skip_special_tokens=False)
    texts = tokenizer.decode_batch([[anchor, i] for i in range(n)], skip_special_tokens=False)
    table = []
    for i, text in enumerate(texts):
        piece = text[len(prefix):] if text.startswith(prefix) else tokenizer.decode([i], skip_special_tokens=False)
        byte = _BYTE_FALLBACK.fullmatch(tokenizer.id_to_token(i) or "")
        table.append(bytes([int(byte[1], 16)]) if byte and piece == "\ufffd" else piece.encode())
    return table


def _gguf_pre_tokenizer(pre: str, where: str) -> pre_tokenizers.PreTokenizer:
    """How text is cut into pieces before BPE, for llama.cpp's tokenizer.ggml.pre name."""

    def split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _LLAMA3_PRE:
        return split_then_bytes(LLAMA3_SPLIT_PATTERN)
    if pre in _QWEN2_PRE:
        return split_then_bytes(_QWEN2_SPLIT_PATTERN)
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in _GPT2_PRE:
        return gpt2
    known = sorted(_LLAMA3_PRE | _QWEN2_PRE | _DIGITS_THEN_GPT2_PRE | _GPT2_PRE)
    raise TokenizerError(
        f"{where}: unsupported tokenizer.ggml.pre {pre!r} (known: {', '.join(known)}); "
        "use the checkpoint's tokenizer.json instead"
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an optional side file; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable JSON ({e}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object; fix or delete the file")
    return data


def _chat_templates(config: dict[str, Any], directory: Path) -> dict[str, str]:
    """The chat templates by name ("default", "tool_use", ...) as transformers reads them: from chat_template.jinja
    (the default one) and additional_chat_templates/NAME.jinja (newer checkpoints) when there are any, which take
    priority, else from tokenizer_config.json (one template, or a list of named ones)."""
    files = {"default": directory / "chat_template.jinja",
             **{path.stem: path for path in sorted((directory / "additional_chat_templates").glob("*.jinja"))}}
    templates = {name: path.read_text(encoding="utf-8") for name, path in files.items() if path.is_file()}
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}], as Hermes 2 Pro and Hermes 3 ship theirs
        return {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    return {"default": template} if template is not None else {}
