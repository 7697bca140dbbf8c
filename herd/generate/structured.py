"""Structured output: JSON (any object, or one that validates against a schema) enforced while decoding, by xgrammar.

A grammar is compiled once per schema against the model's vocabulary; each sequence gets its own matcher, which
masks every token that cannot continue a valid document and is told each token chosen (see `Constraint`).
"""
from __future__ import annotations

import functools
import json
import re
import threading
from typing import Any

import torch


class GrammarError(ValueError):
    pass


# What a schema may ask of the grammar compiler, which runs while the server waits on it: its time grew with the
# schema's nesting (an array of arrays 200 deep took 0.35 s, 900 deep 69 s) and with the square of a pattern's
# counted repeats (`[a-z]{1,1000}` 0.04 s, `{1,20000}` 25 s), so a request of a few hundred bytes could hold it.
MAX_SCHEMA_DEPTH = 64  # levels of the schema document
MAX_PATTERN_REPEATS = 2000  # the counts in all of its patterns' {m}, {m,} and {m,n}, added up


def check_schema_size(schema: Any) -> None:
    """GrammarError where `schema` nests deeper or repeats more than the limits above."""
    repeats, stack = 0, [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep: flatten it")
        if isinstance(value, dict):
            if isinstance(value.get("pattern"), str):
                repeats += sum(int(n) for pair in re.findall(r"\{(\d+)(?:,(\d*))?\}", value["pattern"])
                               for n in pair if n)
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    if repeats > MAX_PATTERN_REPEATS:
        raise GrammarError(f"the JSON schema's patterns repeat {repeats} times in all ({{m,n}} counts); at most "
                           f"{MAX_PATTERN_REPEATS} are allowed")


class JsonConstraint:
    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        masked = logits.float().clone().unsqueeze(0)
        self._xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device))
        return masked[0]

    def accept(self, token: int) -> None:
        self.matcher.accept_token(token)


class JsonGrammars:
    """Compiles JSON grammars for one tokenizer and model vocabulary (the vocabulary is read once, lazily)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()

    @functools.cached_property
    def _compiler(self):
        import xgrammar as xgr

        special = set(self.tokenizer.special_tokens.values())
        n = max(self.tokenizer.vocab_size, max(special) + 1)
        # Special tokens are never text inside a document: xgrammar treats empty entries as such.
        vocab = [b"" if i in special else self.tokenizer.decode_bytes([i]) for i in range(n)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=max(self.vocab_size, n),
                                 stop_token_ids=sorted(self.tokenizer.stop_ids))
        return xgr.GrammarCompiler(info, max_threads=1)

    def constraint(self, schema: dict[str, Any] | None) -> JsonConstraint:
        """A fresh matcher for any JSON object (schema None) or for documents valid under `schema`."""
        check_schema_size(schema)
        with self._lock:
            compiled = self._compile(json.dumps(schema if schema is not None else {"type": "object"}, sort_keys=True))
        return JsonConstraint(compiled, compiled.tokenizer_info.vocab_size)

    @functools.lru_cache(maxsize=64)
    def _compile(self, schema_text: str):
        try:
            # Compact JSON: a model allowed free whitespace can pad forever and never close the document.
            return self._compiler.compile_json_schema(schema_text, any_whitespace=False)
        except Exception as error:  # noqa: BLE001 - xgrammar reports a bad schema with assorted exception types
            raise GrammarError(f"the JSON schema cannot be used: {str(error).splitlines()[0]}") from None
