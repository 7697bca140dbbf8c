"""Structured output: a schema is either enforced while decoding, so that every document it lets through validates,
or refused with a GrammarError that says what to change. Checked against the `jsonschema` package."""
import json
import re
from typing import Annotated

import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field

import herd
from herd.generate.structured import GrammarError, JsonGrammars
from herd.tokenizer.tool_calls import BUILTIN_PARAMETERS, call_schema


@pytest.fixture(scope="module")
def grammars():
    tokenizer = herd.load_tokenizer()
    return JsonGrammars(tokenizer, 128256)


def raw_matcher(grammars, schema):
    """xgrammar's own matcher of `schema`, compiled as herd compiles it but without herd's checks and masks."""
    import xgrammar as xgr

    return xgr.GrammarMatcher(grammars._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))


class Written(str):
    """A document as the model writes it, where no Python value says it: a key twice, a string that is no JSON."""


def grammar_accepts(grammars, schema, document) -> bool:
    """Whether the raw grammar takes `document`, written as the model would write it (json.dumps's separators),
    through to its end."""
    matcher = raw_matcher(grammars, schema)
    text = document if isinstance(document, Written) else json.dumps(document, ensure_ascii=False)
    tokens = grammars.tokenizer.encode(text, bos=False, eos=False)
    return all(matcher.accept_token(t) for t in tokens) and matcher.accept_token(min(grammars.tokenizer.stop_ids))


# Each: a schema the grammar compiler would not enforce, and a document it lets through that the schema forbids.
UNENFORCEABLE = {
    "pattern beside format": ({"type": "string", "pattern": "^(yes|no)$", "format": "uuid"},
                              "c3549253-dec2-4b29-8ed7-f66543886856"),
    "maxLength beside format": ({"type": "string", "maxLength": 4, "format": "date"}, "2020-01-01"),
    "maxLength beside pattern": ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 2}, "abcd"),
    "multipleOf on numbers": ({"type": "number", "multipleOf": 0.5}, 0.3),
    "not": ({"not": {"type": "integer"}}, 1),
    "if/then": ({"if": {"type": "integer"}, "then": {"minimum": 5}}, 1),
    "allOf of two": ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, 1),
    "maxLength beside anyOf": ({"anyOf": [{"type": "string"}, {"type": "integer"}], "maxLength": 2}, "abcdef"),
    "enum of another type": ({"type": "string", "enum": [1, "a"]}, 1),
    "maxLength beside enum": ({"type": "string", "enum": ["a", "bb"], "maxLength": 1}, "bb"),
    "lookahead": ({"type": "string", "pattern": "^(?!bad)[a-z]+$"}, "bad"),
    "required but undefined": ({"type": "object", "required": ["x"], "additionalProperties": True}, {}),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1]),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, {"a": 1}),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, []),
    "maxLength beside $ref": ({"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "maxLength": 1}, "abc"),
    "multipleOf a fraction on integers": ({"type": "integer", "multipleOf": 2.5}, 3),
    "property matching patternProperties": ({"type": "object", "properties": {"x_a": {"type": "integer"}},
                                             "patternProperties": {"^x_": {"maximum": 3}}}, {"x_a": 7}),
    # xgrammar applies these only where the type is given (or implied by properties or items).
    "maxLength without a type": ({"maxLength": 2}, "xyz"),
    "minimum without a type": ({"minimum": 5}, 1),
    "minItems without a type": ({"minItems": 2}, [1]),
    "maxProperties without a type": ({"maxProperties": 1}, {"a": 1, "b": 2}),
    "minProperties beside additionalProperties": ({"type": "object", "additionalProperties": {"type": "boolean"},
                                                   "minProperties": 2}, Written('{"a": true, "a": true}')),
}


@pytest.mark.parametrize("name", UNENFORCEABLE)
def test_a_schema_decoding_cannot_enforce_is_refused(grammars, name):
    schema, invalid = UNENFORCEABLE[name]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(invalid) if isinstance(invalid, Written) else invalid, schema,
                            format_checker=jsonschema.FormatChecker())
    # Why it is refused: compiled as it stands, the grammar lets the invalid document through.
    assert grammar_accepts(grammars, schema, invalid)
    nested = {"type": "object", "properties": {"a": {"type": "array", "items": schema}}, "required": ["a"]}
    for whole in (schema, nested):
        with pytest.raises(GrammarError, match="cannot be enforced: "):
            grammars.constraint(whole)


@pytest.mark.parametrize(("pattern", "char", "value", "raw"), [
    ('^x"y$', '"', 'x"y', '"x"y"'), ("^x\\x22y$", '"', 'x"y', '"x"y"'), ("^x\\u0022y$", '"', 'x"y', '"x"y"'),
    ('^(a|")$', '"', '"', None), ("^C:\\\\[a-z]+$", "\\", "C:\\ab", '"C:\\ab"'), ("^a\\tb$", "\t", "a\tb", '"a\tb"'),
    ("^a\tb$", "\t", "a\tb", '"a\tb"'),
])
def test_a_pattern_that_matches_what_json_escapes_is_refused(grammars, pattern, char, value, raw):
    """xgrammar never writes a quote, backslash or control character that a pattern matches as itself escaped, as a
    JSON string must hold it: it writes it raw, text that is no JSON (a tab also left no token at all, as herd masks
    every token with a raw control character: a 500 that blamed the model's weights), or leaves the branch out."""
    schema = {"type": "string", "pattern": pattern}
    jsonschema.validate(value, schema)
    assert not grammar_accepts(grammars, schema, value)
    if raw:
        assert grammar_accepts(grammars, schema, Written(raw))
        with pytest.raises(ValueError):
            json.loads(raw)
    message = f"cannot be enforced: the pattern {pattern!r} matches {char!r} as itself"
    for whole in (schema, {"type": "object", "patternProperties": {pattern: {"type": "null"}},
                           "additionalProperties": False}):
        with pytest.raises(GrammarError, match=re.escape(message)):
            grammars.constraint(whole)


@pytest.mark.parametrize("pattern,good,bad", [
    ('^[a"]+$', "aa", "ab"), ('^[^"\\\\]+$', "x y", 'x"y'), ("^\\d+\\.\\d{2}$", "12.50", "12.5"),
    ("^a[\\t ]b$", "a b", "a_b"), ("^(?:ab|c\\-d)\\s$", "c-d ", "c-d"),
])
def test_a_pattern_whose_quotes_or_controls_are_in_classes_is_taken(grammars, pattern, good, bad):
    """xgrammar keeps a class to the characters a string may hold raw, and the rest of a pattern is its own: what
    the pattern matches is taken, what it does not, refused; a quote or a tab its class names never comes out (it
    would need an escape), which keeps every document valid."""
    schema = {"type": "string", "pattern": pattern}
    assert re.search(pattern, good) and not re.search(pattern, bad)  # the cases mean what they say
    assert grammar_accepts(grammars, schema, good) and not grammar_accepts(grammars, schema, bad)
    for narrowed in ('a"a', "a\tb"):
        assert not (re.search(pattern, narrowed) and grammar_accepts(grammars, schema, narrowed))


@pytest.mark.parametrize("schema", [{"type": "object", "required": [{"type": "function"}]}, {"type": "strin"},
                                    {"properties": 3}, {"type": "integer", "minimum": "x"}])
def test_a_schema_that_is_no_json_schema_is_refused(grammars, schema):
    with pytest.raises(GrammarError, match="the JSON schema is invalid at "):
        grammars.constraint(schema)


def test_a_schema_over_openai_s_limits_is_refused_before_the_compiler_sees_it(grammars):
    """12,000 properties, each an enum of five values (938 KB), had held the compiler, and every other request's
    grammar with it, for 137 s; OpenAI's structured outputs take at most 5,000 properties and 1,000 enum values."""
    from herd.tools.functions import check_parameters

    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5001)}}
    enums = {"type": "object", "properties": {f"p{i}": {"enum": [1, 2, 3, 4, 5, 6, 7]} for i in range(143)}}
    with pytest.raises(GrammarError, match="holds 5001 object properties in all; at most 5000"):
        grammars.constraint(many)
    with pytest.raises(GrammarError, match="holds 1001 enum values in all; at most 1000"):
        grammars.constraint(enums)
    with pytest.raises(ValueError, match="'f'.s parameter schema is too large: .* 5001 object properties"):
        check_parameters("f", many)
    grammars.constraint({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(50)}})


def test_a_reference_outside_the_schema_is_refused_not_read_as_any_value(grammars):
    remote = {"type": "object", "properties": {"a": {"$ref": "https://example.com/thing.json"}}, "required": ["a"]}
    assert grammar_accepts(grammars, remote, {"a": [1, "anything"]})
    with pytest.raises(GrammarError, match="points outside the schema"):
        grammars.constraint(remote)


def test_properties_are_written_in_the_schema_s_order(grammars):
    # They had been sorted (the grammar compiled from sorted JSON): an answer before the reasoning asked first.
    def schema(*names):
        return {"type": "object", "properties": {n: {"type": "integer"} for n in names}, "required": list(names),
                "additionalProperties": False}

    for names in (("reasoning", "answer"), ("answer", "reasoning")):
        constraint = grammars.constraint(schema(*names))
        assert constraint.matcher.accept_string(json.dumps(dict.fromkeys(names, 1)))
        other = grammars.constraint(schema(*names))
        assert not other.matcher.accept_string(json.dumps(dict.fromkeys(reversed(names), 1)))


def test_a_schema_the_compiler_refuses_is_told_in_its_words_without_its_source_lines(grammars):
    # xgrammar opens its messages with a time and a line of its C++ ("[14:42:36] /project/cpp/...cc:5088: ").
    with pytest.raises(GrammarError) as refused:
        grammars.constraint({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
    assert str(refused.value) == "the JSON schema cannot be used: Cannot find field '$defs' in #/$defs/missing"


class Colour(BaseModel):
    name: str = Field(max_length=12)
    rgb: list[Annotated[int, Field(ge=0, le=255)]] = Field(min_length=3, max_length=3)


class Cat(BaseModel):
    kind: str = Field("cat", pattern="^cat$")
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    kind: str = Field("dog", pattern="^dog$")
    good: bool


class Record(BaseModel):
    """What pydantic writes for common types: nested models ($ref), Optional (anyOf with null), enums, unions."""
    title: str = Field(description="a title", min_length=1, max_length=20)
    year: int | None = Field(None, ge=1900, le=2100)
    colour: Colour
    tags: list[str] = Field(default_factory=list, max_length=3)
    mood: str = Field(json_schema_extra={"enum": ["calm", "busy"]})
    pet: Cat | Dog
    score: float = Field(ge=0, le=1)


def test_documents_decoded_under_common_schemas_validate(grammars):
    """Random logits, masked by the constraint, sampled until the grammar ends: every document parses and validates
    (against pydantic's own schema and a hand-written one with the keywords that are enforced)."""
    hand = {"type": "object", "properties": {
        "id": {"type": "integer", "multipleOf": 7, "minimum": -50, "maximum": 50},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "when": {"type": "string", "format": "date"},
        "flags": {"type": "array", "items": {"enum": ["a", "b", None]}, "minItems": 1, "maxItems": 2},
        "extra": {"type": "object", "additionalProperties": {"type": "boolean"}, "maxProperties": 2}},
        "required": ["id", "code", "when"], "additionalProperties": False}
    checked = 0
    for schema in (Record.model_json_schema(), hand):
        for document in random_documents(grammars, schema, range(6)):
            # `format` is an annotation by default in JSON Schema; the grammar holds a date to its shape (months
            # 01-12, days 01-31), not to the calendar (it lets 02-30 through), so the shape is what is checked.
            jsonschema.validate(document, schema)
            if schema is hand:
                assert re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", document["when"])
            else:
                Record.model_validate(document)
            checked += 1
    assert checked >= 10  # most random walks end within the budget


def random_documents(grammars, schema, seeds, steps=400):
    """Documents decoded from random logits masked by the constraint of `schema`, one a seed, but for walks that
    ramble on past `steps` tokens (tokens that end a string, number, array or object are favoured, so that most end
    within them)."""
    tokenizer = grammars.tokenizer
    closing = torch.tensor([any(c in tokenizer.decode_bytes([t]) for c in b'"]},') for t in range(128000)])
    boost = torch.zeros(128256)
    boost[:128000][closing] = 4.0
    for seed in seeds:
        constraint, rng, tokens = grammars.constraint(schema), torch.Generator().manual_seed(seed), []
        for _ in range(steps):
            logits = constraint.mask(torch.randn(128256, generator=rng) * 3 + boost)
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng))
            if token in tokenizer.stop_ids:
                yield json.loads(tokenizer.decode(tokens))
                break
            constraint.accept(token)
            tokens.append(token)


# Tool parameters with a nested model under $defs, as pydantic writes them (and openai's pydantic_function_tool), and
# recursive ones whose `#` is the parameters themselves.
LATITUDE = {"type": "integer", "minimum": -90, "maximum": 90}
LOCATED = {"$defs": {"Loc": {"type": "object", "properties": {"lat": LATITUDE}, "required": ["lat"]}},
           "type": "object", "properties": {"where": {"$ref": "#/$defs/Loc"}}, "required": ["where"]}
TREE = {"type": "object", "properties": {"v": {"type": "boolean"}, "child": {"$ref": "#"}}, "required": ["v"]}


def test_a_forced_call_follows_the_references_within_its_tool_s_parameters(grammars):
    """The parameters lie inside the call's schema, where their references had been read against the call's:
    `#/$defs/Loc` found nothing (a 400), and `#` let a whole call stand where the parameters recurse."""
    tools = [{"type": "function", "function": {"name": name, "parameters": parameters}}
             for name, parameters in (("locate", LOCATED), ("tree", TREE))]
    schema = call_schema(tools)
    assert grammar_accepts(grammars, schema, {"name": "tree", "parameters": {"v": True, "child": {"v": False}}})
    assert not grammar_accepts(grammars, schema, {"name": "tree", "parameters": {
        "v": True, "child": {"name": "tree", "parameters": {"v": False}}}})
    assert not grammar_accepts(grammars, schema, {"name": "locate", "parameters": {"where": {"lat": 91}}})
    calls = list(random_documents(grammars, schema, range(2)))
    assert {call["name"] for call in calls} == {"locate", "tree"}
    for call in calls:
        jsonschema.validate(call["parameters"], LOCATED if call["name"] == "locate" else TREE)


@pytest.mark.parametrize("schema", [{"type": "string", "minLength": 2}, {"type": "string", "maxLength": 9},
                                    {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}])
def test_no_raw_control_character_is_ever_allowed(grammars, schema):
    """JSON strings must escape control characters; xgrammar lets a raw tab into a string with a length bound."""
    tokenizer = grammars.tokenizer
    opening = tokenizer.encode('{"s": "a' if schema["type"] == "object" else '"a', bos=False, eos=False)
    tab, plain = (tokenizer.encode(text, bos=False, eos=False)[0] for text in ("\t", "b"))
    raw = raw_matcher(grammars, schema)
    constraint = grammars.constraint(schema)
    for token in opening:
        assert raw.accept_token(token)
        constraint.accept(token)
    allowed = constraint.mask(torch.zeros(128256)) > -float("inf")
    assert allowed[plain] and not allowed[tab]
    controls = [t for t in range(128000) if any(b < 32 for b in tokenizer.decode_bytes([t]))]
    assert len(controls) > 1000 and not allowed[controls].any()
    if "Length" in json.dumps(schema):
        assert raw.accept_token(tab)  # why the mask is needed: the grammar alone takes it


def test_no_utf16_surrogate_is_ever_allowed(grammars):
    """Bytes ED A0-BF .. encode a UTF-16 surrogate, which no UTF-8 decoder takes: the grammar alone lets a string
    have one (decoded, three U+FFFD broke a maxLength), the constraint never does, across tokens included."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}, "required": ["s"]}
    vocab, tokenizer = grammars._vocab, grammars.tokenizer
    ed, surrogate, valid = (vocab.index(piece) for piece in (b"\xed", b"\xb6", b"\x9f"))  # ED 9F ..: U+D7C0-U+D7FF
    raw = raw_matcher(grammars, schema)
    constraint = grammars.constraint(schema)
    for token in [*tokenizer.encode('{"s": "a', bos=False, eos=False), ed]:
        assert raw.accept_token(token)
        constraint.accept(token)
    allowed = constraint.mask(torch.zeros(128256)) > -float("inf")
    assert allowed[valid] and not allowed[surrogate]
    assert raw.accept_token(surrogate)  # why the rule is needed


@pytest.mark.parametrize(("name", "parameters", "words"), [
    ("echo", {"type": "string", "maxLength": 5}, "tool 'echo': its parameters must be an object schema, not of type "
                                                 "'string'"),
    ("brave_search", {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
     "tool 'brave_search' is named as a Llama 3.1 built-in, which takes one string 'query': rename the function"),
    ("code_interpreter", {"type": "object", "properties": {"code": {"type": "integer"}}},
     "tool 'code_interpreter' is named as a Llama 3.1 built-in, which takes one string 'code'"),
])
def test_a_function_no_call_could_be_made_of_is_refused_by_name(name, parameters, words):
    """A call forced to a function of other than object parameters had come back as the reply's text (finish "stop",
    no tool_calls); one to a function named as a built-in had been read as the built-in's (its arguments made
    {"query": ...}, or the call dropped)."""
    with pytest.raises(ValueError, match=re.escape(words)):
        call_schema([{"type": "function", "function": {"name": name, "parameters": parameters}}])


def test_a_function_named_as_a_built_in_is_called_with_the_built_in_s_arguments():
    """Its own parameters may leave the query optional, and a call without one is no call of the built-in."""
    query = {"type": "object", "properties": {"query": {"type": "string"}}}
    for parameters in (query, None):
        tool = {"type": "function", "function": {"name": "brave_search", "parameters": parameters}}
        [option] = call_schema([tool])["anyOf"]
        assert option["properties"]["parameters"] == BUILTIN_PARAMETERS["brave_search"]


def test_compiled_grammars_are_bounded_in_memory_and_freed_with_their_model(monkeypatch):
    """xgrammar had kept every grammar it compiled (about 0.4 MiB an ordinary schema: a server meeting new schemas
    grew without end), and the compile cache, on the class, kept every model's JsonGrammars alive."""
    import gc
    import weakref

    from herd.generate import structured

    monkeypatch.setattr(structured, "GRAMMAR_CACHE_BYTES", 1 << 20)
    grammars = JsonGrammars(herd.load_tokenizer(), 128256)
    for i in range(24):
        grammars.constraint({"type": "object", "properties": {f"field_{i}": {"type": "string", "maxLength": 40},
                                                              "count": {"type": "integer"}}, "required": ["count"]})
    assert grammars._compiler.get_cache_size_bytes() <= 1.5 * (1 << 20)
    gone = weakref.ref(grammars)
    del grammars
    gc.collect()
    assert gone() is None
