"""Structured output: JSON (any object, or one that validates against a schema) enforced while decoding, by xgrammar.

A grammar is compiled once per schema against the model's vocabulary; each sequence gets its own matcher, which
masks every token that cannot continue a valid document and is told each token chosen (see `Constraint`).
"""
from __future__ import annotations

import functools
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    from re import _parser as _regex_parser  # Python 3.11 and later
except ImportError:
    import sre_parse as _regex_parser


class GrammarError(ValueError):
    pass


# What a schema may ask of the grammar compiler, which runs while the server waits on it: its time grew with the
# schema's nesting (an array of arrays 200 deep took 0.35 s, 900 deep 69 s) and with the square of a pattern's
# counted repeats (`[a-z]{1,1000}` 0.04 s, `{1,20000}` 25 s), so a request of a few hundred bytes could hold it.
MAX_SCHEMA_DEPTH = 64  # levels of the schema document
MAX_PATTERN_REPEATS = 2000  # the counts in all of its patterns' {m}, {m,} and {m,n}, added up
# OpenAI's documented limits for structured outputs: a schema of 12,000 properties, each an enum of five values
# (938 KB, under the body limit), had held the compiler, and every other request's grammar, for 137 s.
MAX_PROPERTIES = 5000  # object properties, all objects together
MAX_ENUM_VALUES = 1000  # enum values, all enums together
# xgrammar keeps every grammar it compiles unless given a limit (about 0.4 MiB for an ordinary schema): a server
# meeting new schemas and tool lists grew by that much per request for as long as it ran. vLLM bounds it too.
GRAMMAR_CACHE_BYTES = 64 << 20


def check_schema_size(schema: Any) -> None:
    """GrammarError where `schema` nests deeper, repeats more or holds more properties or enum values than the
    limits above."""
    repeats, properties, enums, stack = 0, 0, 0, [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the JSON schema nests more than {MAX_SCHEMA_DEPTH} levels deep: flatten it")
        if isinstance(value, dict):
            # A patternProperties key is a pattern the compiler builds as well.
            patterns = [value.get("pattern"), *(value["patternProperties"] if isinstance(
                value.get("patternProperties"), dict) else ())]
            repeats += sum(int(n) for pattern in patterns if isinstance(pattern, str)
                           for pair in re.findall(r"\{(\d+)(?:,(\d*))?\}", pattern) for n in pair if n)
            properties += len(value["properties"]) if isinstance(value.get("properties"), dict) else 0
            enums += len(value["enum"]) if isinstance(value.get("enum"), list) else 0
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    for count, limit, what in ((properties, MAX_PROPERTIES, "object properties"),
                               (enums, MAX_ENUM_VALUES, "enum values")):
        if count > limit:
            raise GrammarError(f"the JSON schema holds {count} {what} in all; at most {limit} are allowed (as "
                               "OpenAI's structured outputs): split the request")
    if repeats > MAX_PATTERN_REPEATS:
        raise GrammarError(f"the JSON schema's patterns repeat {repeats} times in all ({{m,n}} counts); at most "
                           f"{MAX_PATTERN_REPEATS} are allowed")


# Keywords that only describe a schema: they may stand beside any other keyword.
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
                "discriminator", "$defs", "definitions", "$id", "$schema", "$anchor"}
_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None),
          "object": dict, "array": list}
_LOOKAROUND = re.compile(r"\(\?<?[=!]")


def _of_type(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    return any(isinstance(value, _TYPES.get(k, ())) and not (isinstance(value, bool) and k in ("integer", "number"))
               or k == "integer" and isinstance(value, float) and value.is_integer() for k in kinds)


def _json_escaped(pattern: str) -> str | None:
    """The first character `pattern` matches as itself (outside a character class) that a JSON string holds only
    escaped, a quote, a backslash or a control character, or None. xgrammar 0.2.9 writes such a character raw into
    the string (`"x"y"` for '^x"y$', an invalid escape for a backslash, a tab that no token may carry) or, among
    alternatives, leaves it out, while it keeps a class to the characters a string may hold raw."""
    # Python's parser reads every escape (\x22, \u0022, \N{...}): a schema's patterns got here only if Python's re
    # compiles them (the metaschema's "regex" format). Classes become `.` first, as the parser makes single
    # characters of alternatives into a class (`(a|")` is read as `[a"]`), so that every class left is of those.
    outside, i = [], 0
    while i < len(pattern):
        if pattern[i] == "[":
            i += 1 + pattern.startswith("^", i + 1)
            i += pattern.startswith("]", i)  # a `]` first in a class is itself
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            outside.append(".")
            i += 1
        else:
            step = 2 if pattern[i] == "\\" else 1
            outside.append(pattern[i:i + step])
            i += step
    try:
        stack = [_regex_parser.parse("".join(outside))]
    except re.error:  # a `[` in a verbose pattern's comment: xgrammar, which takes no inline flags, refuses it
        return None
    while stack:
        for op, value in stack.pop():
            if op is _regex_parser.IN:
                literals = [v for o, v in value if o is _regex_parser.LITERAL]
            else:
                literals = [value] if op is _regex_parser.LITERAL else []
            if found := [chr(c) for c in literals if c < 0x20 or chr(c) in '"\\']:
                return found[0]
            stack += _subpatterns(value)
    return None


def _subpatterns(value: Any):
    """The parsed subpatterns among an operation's arguments (a group's, a repeat's, each of a branch's)."""
    if isinstance(value, _regex_parser.SubPattern):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subpatterns(item)


def _subschemas(schema: dict[str, Any]):
    for key in ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties",
                "additionalItems", "unevaluatedItems"):
        if isinstance(schema.get(key), dict):
            yield schema[key]
    for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
        if isinstance(schema.get(key), dict):
            yield from (v for v in schema[key].values() if isinstance(v, dict))
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            yield from (v for v in schema[key] if isinstance(v, dict))


# Keywords that constrain one type of value. xgrammar applies them only where the schema says which type (or its
# properties or items imply an object or an array); in a schema without one they were silently dropped.
_OF_ONE_TYPE = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
                "pattern", "format", "minItems", "maxItems", "minProperties", "maxProperties", "propertyNames",
                "patternProperties"}
_TYPE_IMPLIED_BY = {"type", "properties", "additionalProperties", "items", "prefixItems", "enum", "const", "$ref",
                    "anyOf", "oneOf", "allOf"}


def _unenforceable(schema: dict[str, Any]) -> str | None:
    """Why the grammar compiler would let through documents that `schema` (one level of it) forbids, or None.
    Measured on xgrammar 0.2.9: it ignores these silently (or with a warning on stderr) rather than refusing them,
    and a reply that does not validate is worse than a 400 the client can act on."""
    keys = set(schema) - _ANNOTATIONS
    if not keys & _TYPE_IMPLIED_BY and (found := sorted(keys & _OF_ONE_TYPE)):
        return f"'{found[0]}' in a schema without a type is not enforced: give that schema its type"
    if isinstance(schema.get("$ref"), str) and not schema["$ref"].startswith("#"):
        return f"$ref {schema['$ref']!r} points outside the schema, which is not fetched: put it under $defs"
    if found := sorted(keys & {"not", "if", "then", "else"}):
        return f"'{found[0]}' cannot be enforced while decoding: express the schema with anyOf instead"
    if found := sorted(keys & {"dependentRequired", "dependentSchemas"}):
        return f"'{found[0]}' cannot be enforced while decoding: make the properties required or list the cases " \
               "with anyOf"
    if schema.get("uniqueItems") is True:
        return "uniqueItems cannot be enforced while decoding: check the items after, or use an object keyed by them"
    if len(schema.get("allOf") or []) > 1:
        return "allOf with more than one schema cannot be enforced while decoding: merge them into one schema"
    for union in ("anyOf", "oneOf", "allOf"):
        if union in schema and (others := sorted(keys - {union})):
            return f"'{others[0]}' beside {union} is not enforced: move it into each of the {union} schemas"
    for fixed in ("enum", "const"):
        if fixed in schema:
            values = schema[fixed] if fixed == "enum" and isinstance(schema[fixed], list) else [schema[fixed]]
            if others := sorted(keys - {fixed, "type"}):
                return f"'{others[0]}' beside {fixed} is not enforced: list only the allowed values"
            if "type" in schema and (wrong := [v for v in values if not _of_type(v, schema["type"])]):
                return f"{fixed} value {wrong[0]!r} is not of type {schema['type']}"
    if "pattern" in schema and "format" in schema:
        return "pattern and format together are not enforced: use pattern alone"
    if ("pattern" in schema or "format" in schema) and keys & {"minLength", "maxLength"}:
        return "minLength/maxLength beside a pattern or format are not enforced: put the length in the pattern"
    if isinstance(schema.get("pattern"), str) and _LOOKAROUND.search(schema["pattern"]):
        return f"the pattern {schema['pattern']!r} looks around ((?=, (?!, (?<=, (?<!), which is not enforced"
    for pattern in [schema.get("pattern"), *(schema.get("patternProperties") or {})]:
        if isinstance(pattern, str) and (char := _json_escaped(pattern)):
            return f"the pattern {pattern!r} matches {char!r} as itself, which xgrammar does not escape in a JSON " \
                   "string (it writes it raw, or never): leave quotes, backslashes and control characters out of " \
                   "patterns"
    if "multipleOf" in schema and schema.get("type") != "integer":
        return "multipleOf is enforced only on integers: give the schema type integer"
    if "multipleOf" in schema and not float(schema["multipleOf"]).is_integer():
        return f"multipleOf {schema['multipleOf']} is not enforced on integers: use a whole number"
    if "contains" in keys:
        return "'contains' cannot be enforced while decoding: check the items after, or place the item with " \
               "prefixItems"
    if "$ref" in schema and (others := sorted(keys - {"$ref"})):
        return f"'{others[0]}' beside $ref is not enforced: move it into the referenced schema"
    for name in schema.get("properties") or {}:
        if matched := [p for p in schema.get("patternProperties") or {} if re.search(p, name)]:
            return f"property {name!r} also matches patternProperties {matched[0]!r}, whose schema is not applied " \
                   "to it: merge that schema into the property's"
    if schema.get("minProperties", 0) > 1 and (schema.get("additionalProperties", False) is not False
                                               or keys & {"patternProperties", "propertyNames"}):
        return "minProperties beside additionalProperties, patternProperties or propertyNames is not enforced (a " \
               "key may be written twice): require the properties by name"
    if isinstance(schema.get("required"), list) and (
            missing := [n for n in schema["required"] if n not in (schema.get("properties") or {})]):
        return f"required names {missing[0]!r}, which properties does not define: define it under properties"
    return None


def check_enforceable(schema: Any) -> None:
    """GrammarError where `schema` is no JSON Schema, or some part of it asks what decoding cannot guarantee (see
    `_unenforceable`)."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/".join(map(str, error.absolute_path)) or "the root"
        raise GrammarError(f"the JSON schema is invalid at {where}: {error.message}") from None
    stack = [schema] if isinstance(schema, dict) else []
    while stack:
        part = stack.pop()
        if reason := _unenforceable(part):
            raise GrammarError(f"the JSON schema cannot be enforced: {reason}")
        stack += _subschemas(part)


@dataclass(frozen=True)
class TextTokens:
    """Which tokens may carry a JSON document's text, as xgrammar token bitmasks (bit i of word i // 32: token i).

    xgrammar 0.2.9 lets through bytes no JSON text may hold, and a reply then fails to parse or to validate:
    - a raw control character (bytes 0-31) inside a string with minLength or maxLength (compact JSON has none
      outside strings, and a string must escape them);
    - a UTF-16 surrogate encoded in UTF-8 (ED A0-BF ..), which no UTF-8 decoder takes: it became three U+FFFD and
      broke a maxLength. Within a token `anywhere` rules it out; across tokens, `after_ed` applies after a token
      that ends in byte ED (those are `ends_ed`)."""

    anywhere: torch.Tensor
    after_ed: torch.Tensor
    ends_ed: frozenset[int]

    @classmethod
    def of(cls, vocab: list[bytes], size: int) -> TextTokens:
        def bitmask(allowed: list[bool]) -> torch.Tensor:
            bits = np.ones(-(-size // 32) * 32, dtype=np.uint64)
            bits[:len(allowed)] = allowed
            words = (bits.reshape(-1, 32) << np.arange(32, dtype=np.uint64)).sum(axis=1)
            return torch.from_numpy(words.astype(np.uint32).view(np.int32)).unsqueeze(0)

        anywhere = bitmask([not _CONTROL_OR_SURROGATE.search(piece) for piece in vocab])
        after_ed = bitmask([not piece or not 0xA0 <= piece[0] <= 0xBF for piece in vocab])
        return cls(anywhere, after_ed, frozenset(i for i, piece in enumerate(vocab) if piece.endswith(b"\xed")))


_CONTROL_OR_SURROGATE = re.compile(rb"[\x00-\x1f]|\xed[\xa0-\xbf]")


class JsonConstraint:
    def __init__(self, compiled, vocab_size: int, text: TextTokens):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.text, self.last_ends_ed = text, False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.bitmask &= self.text.anywhere
        if self.last_ends_ed:
            self.bitmask &= self.text.after_ed
        masked = logits.float().clone().unsqueeze(0)
        self._xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device))
        return masked[0]

    def accept(self, token: int) -> None:
        self.matcher.accept_token(token)
        self.last_ends_ed = token in self.text.ends_ed

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


class JsonGrammars:
    """Compiles JSON grammars for one tokenizer and model vocabulary (the vocabulary is read once, lazily)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        # Per instance: a cache on the method would keep every JsonGrammars (and its compiler) ever made alive.
        self._compiled = functools.lru_cache(maxsize=64)(self._compile)
        self._checked = functools.lru_cache(maxsize=64)(self._check)

    @functools.cached_property
    def _vocab(self) -> list[bytes]:
        special = set(self.tokenizer.special_tokens.values())
        n = max(self.tokenizer.vocab_size, max(special) + 1)
        # Special tokens are never text inside a document: xgrammar treats empty entries as such.
        return [b"" if i in special else self.tokenizer.decode_bytes([i]) for i in range(n)]

    @functools.cached_property
    def _compiler(self):
        import xgrammar as xgr

        info = xgr.TokenizerInfo(self._vocab, xgr.VocabType.RAW, vocab_size=max(self.vocab_size, len(self._vocab)),
                                 stop_token_ids=sorted(self.tokenizer.stop_ids))
        return xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)

    @functools.cached_property
    def _text_tokens(self) -> TextTokens:
        return TextTokens.of(self._vocab, max(self.vocab_size, len(self._vocab)))

    def constraint(self, schema: dict[str, Any] | None) -> JsonConstraint:
        """A fresh matcher for any JSON object (schema None) or for documents valid under `schema`."""
        # In the schema's own order: the grammar writes properties in it (a reason before its answer).
        schema_text = json.dumps(schema if schema is not None else {"type": "object"})
        # Checked before the lock, which only the compiler needs: another request's schema waits for no check.
        self._checked(schema_text)
        with self._lock:
            compiled = self._compiled(schema_text)
        return JsonConstraint(compiled, compiled.tokenizer_info.vocab_size, self._text_tokens)

    @staticmethod
    def _check(schema_text: str) -> None:
        """GrammarError where the schema is too large or cannot be enforced; once a schema (a request's n matchers,
        and every later request with it, take the cached answer; a refusal is not cached)."""
        schema = json.loads(schema_text)
        check_schema_size(schema)
        check_enforceable(schema)

    def _compile(self, schema_text: str):
        """The grammar of a schema (as JSON), compiled once however many matchers use it."""
        try:
            # Compact JSON: a model allowed free whitespace can pad forever and never close the document.
            return self._compiler.compile_json_schema(schema_text, any_whitespace=False)
        except Exception as error:  # noqa: BLE001 - xgrammar reports a bad schema with assorted exception types
            # Its messages open with a time and a source line ("[14:42:36] /project/cpp/...cc:5088: "): not the user's.
            reason = re.sub(r"^\[[\d:.]+\] \S+:\d+: ", "", str(error).splitlines()[0])
            raise GrammarError(f"the JSON schema cannot be used: {reason}") from None
