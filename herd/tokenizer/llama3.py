"""The Llama 3 tokenizer: tiktoken over Meta's 128,000 BPE ranks plus 256 special tokens."""

from __future__ import annotations

import base64
import functools
import importlib.util
import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Literal

import tiktoken

from herd.tokenizer import TokenizerError

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
# Ids follow the BPE ranks in this order; the reserved tokens fill the rest of the 256.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
SPECIAL_TOKEN_NAMES = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)

# tiktoken panics on inputs much longer than this.
_MAX_CHUNK_CHARS = 400_000
# BPE over one long run of whitespace or of non-whitespace is quadratic in tiktoken (openai/tiktoken#195).
_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


class Llama3Tokenizer:
    """Encodes text to Llama 3 token ids and back."""

    chat_template: str | None = None

    def __init__(self, model_path: str | Path | None = None):
        path = Path(model_path) if model_path is not None else bundled_model_path()
        ranks = _read_ranks(path)
        self.special_tokens: dict[str, int] = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
        self._model = tiktoken.Encoding(
            name=path.name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.path = path
        self.ranks = ranks  # the BPE vocabulary itself, for writing it into other formats
        self.vocab_size = len(ranks) + NUM_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int | None = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset(self.special_tokens[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))

    @classmethod
    def default(cls) -> Llama3Tokenizer:
        """The real Llama 3 tokenizer, loaded once per process."""
        return _default_tokenizer()

    def encode(
        self,
        text: str,
        bos: bool = True,
        eos: bool = False,
        allowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Token ids for `text`, of any length.

        Special-token text (e.g. "<|eot_id|>") becomes its special id only when allowed by
        `allowed_special` ("all" or a set of token strings); otherwise it is encoded as the plain text
        it is. Unlike tiktoken's default this never raises, so untrusted text cannot inject control tokens.
        """
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        ids = [self.bos_id] if bos else []
        for piece in _slices(text):
            ids += self._model.encode(piece, allowed_special=allowed, disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids`, which may end inside a UTF-8 character (for streaming)."""
        return self._model.decode_bytes(list(ids))

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token, or of text that is exactly one BPE token; None otherwise."""
        try:
            return self._model.encode_single_token(token)
        except KeyError:
            return None


def bundled_model_path() -> Path:
    """Meta's tokenizer.model, as shipped inside the installed llama-models package."""
    # find_spec locates the package without importing it (and its dependencies).
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "the Llama 3 tokenizer.model comes with the llama-models package, which is not installed: "
            "pip install llama-models, or pass the path of a tokenizer.model"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"


@functools.cache
def _default_tokenizer() -> Llama3Tokenizer:
    return Llama3Tokenizer(bundled_model_path())


def _read_ranks(path: Path) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file: one '<base64 token> <rank>' per line."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TokenizerError(
            f"{path}: cannot read the tokenizer file ({e.strerror}); pass the path of a Llama 3 tokenizer.model"
        ) from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(
                f"{path}: line {number} is not '<base64 token> <rank>', so this is not a tiktoken BPE file; "
                "pass a Llama 3 tokenizer.model, or a tokenizer.json for Hugging Face tokenizers"
            ) from None
    if not ranks:
        raise TokenizerError(f"{path}: the tokenizer file is empty; pass an intact Llama 3 tokenizer.model")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(
            f"{path}: BPE ranks are not the distinct numbers 0..{len(ranks) - 1}, so the file is damaged; "
            "pass an intact Llama 3 tokenizer.model"
        )
    return ranks


def _slices(text: str) -> Iterator[str]:
    """`text` cut where Meta's reference cuts it, so that ids match it and tiktoken stays fast.

    Chunks of 400k characters; inside a chunk, every run of whitespace or of non-whitespace is cut
    each 25k characters from the run's start.
    """
    for start in range(0, len(text), _MAX_CHUNK_CHARS):
        chunk = text[start : start + _MAX_CHUNK_CHARS]
        cut = 0
        if len(chunk) > _MAX_RUN_CHARS:
            for run in _RUNS.finditer(chunk):
                for at in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                    yield chunk[cut:at]
                    cut = at
        yield chunk[cut:]
