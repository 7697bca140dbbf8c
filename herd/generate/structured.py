"""Structured output: JSON (any object, or one that validates against a schema) enforced while decoding, by xgrammar.

A grammar is compiled once per schema against the model's vocabulary; each sequence gets its own matcher, which
masks every token that cannot continue a valid document and is told each token chosen (see `Constraint`).
"""
from __future__ import annotations

import functools
import json
import threading
from typing import Any

import torch


class GrammarError(ValueError):
    pass


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
