"""Tokenizers and chat formats.

`load_tokenizer()` gives the Llama 3 tokenizer (tiktoken over Meta's `tokenizer.model`); checkpoints that
bring their own vocabulary (`tokenizer.json`, a GGUF's metadata) get `HFTokenizer`, which offers the
same interface over the `tokenizers` library. `chat_format_for(tok)` picks how a dialog becomes ids.
"""

from __future__ import annotations

from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or of a kind we cannot use."""


# Submodules import TokenizerError from here, so it must exist before they load.
from herd.tokenizer.chat_format import ChatFormat, chat_format_for  # noqa: E402
from herd.tokenizer.hf import HFTokenizer  # noqa: E402
from herd.tokenizer.llama3 import Llama3Tokenizer  # noqa: E402
from herd.tokenizer.template import TemplateChatFormat, render_template  # noqa: E402

__all__ = [
    "ChatFormat",
    "HFTokenizer",
    "Llama3Tokenizer",
    "TemplateChatFormat",
    "TokenizerError",
    "chat_format_for",
    "load_tokenizer",
    "render_template",
]


def load_tokenizer(path: str | Path | None = None) -> Llama3Tokenizer | HFTokenizer:
    """The tokenizer at `path`, or the real Llama 3 tokenizer when no path is given.

    A `tokenizer.json` (or a directory holding one) or a `.gguf` gives an `HFTokenizer`; any other file
    is read as a tiktoken BPE file (Meta's `tokenizer.model`) and gives a `Llama3Tokenizer`.
    """
    if path is None:
        return Llama3Tokenizer.default()
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_file(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return Llama3Tokenizer(path / "tokenizer.model")
        raise TokenizerError(
            f"{path}: directory has neither tokenizer.json nor tokenizer.model; point at the tokenizer file itself"
        )
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    if path.suffix == ".gguf":
        return _gguf_tokenizer(path)
    return Llama3Tokenizer(path)


def _gguf_tokenizer(path: Path) -> HFTokenizer:
    # herd's own reader: gguf-py's took 7 s over the default model's vocabulary, against 0.6 s
    from herd.gguf_file import GGUFFile

    try:
        reader = GGUFFile(path)
    except Exception as e:  # ValueError, IndexError, struct.error… for any malformed or short file
        raise TokenizerError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download or "
                             "re-convert it") from None
    return HFTokenizer.from_gguf(reader)
