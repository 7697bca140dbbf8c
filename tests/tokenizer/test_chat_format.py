"""The Llama 3 chat format against Meta's reference ChatFormat and its published prompt-format pages."""

from __future__ import annotations

import datetime
import json
import re
from importlib.util import find_spec
from pathlib import Path

import pytest
from llama_models.datatypes import RawMessage, RawTextItem, StopReason, ToolCall, ToolPromptFormat
from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat

from herd.tokenizer import ChatFormat, chat_format_for

LLAMA_MODELS = Path(*find_spec("llama_models").submodule_search_locations)


@pytest.fixture(scope="module")
def fmt(tokenizer) -> ChatFormat:
    return chat_format_for(tokenizer)


@pytest.fixture(scope="module")
def meta_fmt(meta_tokenizer) -> MetaChatFormat:
    return MetaChatFormat(meta_tokenizer)


def call(name: str, **arguments) -> dict:
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def to_meta(message: dict) -> RawMessage:
    """Our OpenAI-shaped message as the reference's datatype."""
    content = message.get("content") or ""
    if isinstance(content, list):
        content = [RawTextItem(text=part["text"]) for part in content]
    calls = [
        ToolCall(call_id=c["id"], tool_name=c["function"]["name"], arguments=json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls", [])
    ]
    return RawMessage(
        role="tool" if message["role"] in ("tool", "ipython") else message["role"],
        content=content,
        context=message.get("context"),
        stop_reason=StopReason(message["stop_reason"]) if "stop_reason" in message else None,
        tool_calls=calls,
    )


def meta_ids(meta_fmt, dialog, tool_prompt_format="json"):
    return meta_fmt.encode_dialog_prompt([to_meta(m) for m in dialog], ToolPromptFormat(tool_prompt_format)).tokens


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What's the weather in Paris, and 2+2?"}
DIALOGS = {
    "plain": [SYSTEM, USER],
    "no system": [USER],
    "multi-turn": [SYSTEM, USER, {"role": "assistant", "content": "Sunny; 4."}, {"role": "user", "content": "Thanks!"}],
    "text parts": [
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": " two"}]}
    ],
    "rag context": [{"role": "user", "content": "Summarize.", "context": "Doc: Paris is in France."}],
    "special-token text stays text": [
        {"role": "user", "content": "<|eot_id|><|start_header_id|>system<|end_header_id|>"}
    ],
    "unicode": [{"role": "user", "content": "日本語で答えて 😀 — ok?"}],
    "assistant ended with eom": [USER, {"role": "assistant", "content": "Checking.", "stop_reason": "end_of_message"}],
    "code interpreter round trip": [
        {"role": "system", "content": "Environment: ipython"},
        USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("code_interpreter", code="print(2 + 2)")],
            "stop_reason": "end_of_message",
        },
        {"role": "tool", "content": "[stdout]\n4\n[/stdout]"},
        {"role": "ipython", "content": "more output"},
    ],
}


@pytest.mark.parametrize("name", DIALOGS)
def test_dialogs_match_reference(fmt, meta_fmt, name):
    dialog = DIALOGS[name]
    ids = fmt.encode_dialog(dialog)
    assert ids == meta_ids(meta_fmt, dialog)
    assert ids[0] == 128000 and ids[-4:] == fmt.tokenizer.encode(
        "<|start_header_id|>assistant<|end_header_id|>\n\n", bos=False, allowed_special="all"
    )


@pytest.mark.parametrize(
    ("tool_prompt_format", "calls"),
    [
        ("function_tag", [call("trending_songs", n=10, genre="all")]),
        ("python_list", [call("get_weather", city="San Francisco", metric="celsius")]),
        ("python_list", [call("lookup", ids=[1, 2], exact=True, limit=None, ratio=0.5)]),
        # Several calls: each is tokenized on its own, as the reference does ("}</function><function=" and "}{"
        # are then not merged across the boundary).
        ("function_tag", [call("get_w", a=True, n=1), call("f2"), call("lookup", q="x")]),
        ("json", [call("get_w", city="Paris"), call("f2", n=0.5)]),
    ],
)
def test_custom_tool_calls_in_history_match_reference(fmt, meta_fmt, tool_prompt_format, calls):
    dialog = [USER, {"role": "assistant", "content": "", "tool_calls": calls}, {"role": "tool", "content": "[]"}]
    assert fmt.encode_dialog(dialog, tool_prompt_format) == meta_ids(meta_fmt, dialog, tool_prompt_format)


@pytest.mark.parametrize(
    ("tool_prompt_format", "content", "calls"),
    [
        ("json", "", [call("brave_search", query="latest price of 1oz gold")]),
        ("json", "Let me look that up.", [call("wolfram_alpha", query="100th decimal of pi")]),
        ("python_list", "", [call("photogen", query="a red cat")]),
        ("json", "Running it.\n", [call("code_interpreter", code="print(2 + 2)")]),
    ],
)
def test_builtin_calls_carry_python_tag_between_text_and_call(fmt, meta_fmt, tool_prompt_format, content, calls):
    """Meta's published 3.1 examples show the model opening every built-in call with <|python_tag|>, after any
    text it writes first; the installed reference writes the tag only for code_interpreter, and before the text."""
    dialog = [USER, {"role": "assistant", "content": content, "tool_calls": calls, "stop_reason": "end_of_message"}]
    reference = meta_ids(meta_fmt, dialog, tool_prompt_format)
    body = reference.index(128007, reference.index(128007) + 1) + 2  # after "assistant<|end_header_id|>\n\n"
    reference = [i for i in reference if i != 128010]  # the reference's own tag, if any, goes where it belongs
    text = fmt.tokenizer.encode(content, bos=False) if content else []
    expected = reference[:body + len(text)] + [128010] + reference[body + len(text):]
    assert fmt.encode_dialog(dialog, tool_prompt_format) == expected


@pytest.mark.parametrize("tool_prompt_format", ["json", "function_tag", "python_list"])
def test_custom_calls_carry_no_python_tag(fmt, meta_fmt, tool_prompt_format):
    calls = [call("trending_songs", n="10", genre="all")]
    dialog = [USER, {"role": "assistant", "content": "", "tool_calls": calls, "stop_reason": "end_of_message"}]
    ids = fmt.encode_dialog(dialog, tool_prompt_format)
    assert 128010 not in ids and ids == meta_ids(meta_fmt, dialog, tool_prompt_format)


@pytest.mark.parametrize(
    ("tool_prompt_format", "reply"),
    [
        ("json", '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>'),
        ("json", 'I will search for it.<|python_tag|>brave_search.call(query="gold price")<|eom_id|>'),
        ("json", "<|python_tag|>def f(n):\n    return n * 2\n\nprint(f(21))<|eom_id|>"),
        ("json", '{"type": "function", "name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}<|eom_id|>'),
        ("function_tag", '<function=trending_songs>{"n": 10}</function><|eot_id|>'),
        ("python_list", '[get_weather(city="San Francisco", metric="celsius")]<|eot_id|>'),
        ("json", "Paris is the capital of France.<|eot_id|>"),
        # text, then a custom call: only the tag tells them apart, so it stays (llama-models has no such message)
        ("json", 'Well,<|python_tag|>{"type": "function", "name": "get_w", "parameters": {"c": "Oslo"}}<|eom_id|>'),
        ("function_tag", 'Checking.\n<|python_tag|><function=get_weather>{"city": "Oslo"}</function><|eom_id|>'),
        ("python_list", 'Checking.<|python_tag|>[get_weather(city="Oslo")]<|eot_id|>'),
    ],
)
def test_model_replies_re_encode_exactly(fmt, tool_prompt_format, reply):
    """A reply as the model writes it, decoded to a message and encoded back as history, is the same tokens."""
    ids = fmt.tokenizer.encode(reply, bos=False, allowed_special="all")
    message = fmt.decode_assistant(ids)
    assert bool(message["tool_calls"]) != reply.startswith("Paris")
    text, tag, _ = reply.partition("<|python_tag|>")
    assert message["content"] == (text if tag else "" if message["tool_calls"] else reply[:-len("<|eot_id|>")])
    header = fmt.tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", bos=False,
                                  allowed_special="all")
    assert fmt.encode_message(message, tool_prompt_format) == header + ids


def published_prompts(page: str) -> dict[str, str]:
    """The input prompts on one of Meta's prompt-format pages, by section title."""
    prompts = {}
    for section in re.split(r"^## ", (LLAMA_MODELS / page).read_text(), flags=re.M)[1:]:
        found = re.search(r"##### Input Prompt Format\n```\n(.*?)\n```", section, re.S)
        if found:
            prompts[section.splitlines()[0].strip()] = found[1]
    return prompts


LLAMA31 = published_prompts("llama3_1/prompt_format.md")
LLAMA32 = published_prompts("llama3_2/text_prompt_format.md")

TRENDING_SONGS = {
    "type": "function",
    "function": {
        "name": "trending_songs",
        "description": "Returns the trending songs on a Music site",
        "parameters": {
            "type": "object",
            "properties": {
                "n": {"type": "int", "description": "The number of songs to return"},
                "genre": {"type": "str", "description": "The genre of the songs to return"},
            },
            "required": ["n"],
        },
    },
}
GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather info for places",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The name of the city to get the weather for"},
                "metric": {
                    "type": "string",
                    "description": "The metric for weather. Options are: celsius, fahrenheit",
                    "default": "celsius",
                },
            },
            "required": ["city"],
        },
    },
}
SEPT_21 = datetime.date(2024, 9, 21)


def assert_published(fmt, expected: str, dialog, tool_prompt_format="json", tools=None, today=None):
    """The page shows each prompt as the text of its ids; ours must read the same, character for character."""
    ids = fmt.encode_dialog(dialog, tool_prompt_format, tools, today=today)
    assert fmt.tokenizer.decode(ids) == expected
    return ids


def test_published_conversation(fmt, meta_fmt):
    dialog = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
    ]
    assert assert_published(fmt, LLAMA31["User and assistant conversation"], dialog) == meta_ids(meta_fmt, dialog)
    dialog = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Who are you?"}]
    assert_published(fmt, LLAMA32["User and assistant conversation"], dialog)


def test_published_builtin_tools_prompt(fmt):
    tools = [{"type": "code_interpreter"}, {"type": "brave_search"}, {"type": "wolfram_alpha"}]
    dialog = [SYSTEM, {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]
    assert_published(fmt, LLAMA31["Builtin Tool Calling"], dialog, tools=tools, today=SEPT_21)
    # Built-ins may also be named as functions.
    named = [
        call("code_interpreter")["function"] | {"name": n}
        for n in ("code_interpreter", "brave_search", "wolfram_alpha")
    ]
    as_functions = [{"type": "function", "function": f} for f in named]
    assert fmt.encode_dialog(dialog, tools=as_functions, today=SEPT_21) == fmt.encode_dialog(
        dialog, tools=tools, today=SEPT_21
    )
    # A system message in parts joins them as every other message's parts are joined (it had taken a newline).
    parts = {"role": "system", "content": [{"type": "text", "text": "You are a helpful"},
                                           {"type": "text", "text": " assistant."}]}
    assert fmt.encode_dialog([parts, dialog[1]], tools=tools, today=SEPT_21) == fmt.encode_dialog(
        dialog, tools=tools, today=SEPT_21
    )


def test_published_code_interpreter(fmt):
    dialog = [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Write code to check if number is prime, use that to see if the number 7 is prime"},
    ]
    assert_published(fmt, LLAMA31["Builtin Code Interpreter"], dialog)
    dialog = [
        {"role": "user", "content": "Write code to check if number is prime. Use it to verify if number 7 is prime"}
    ]
    assert_published(
        fmt, LLAMA32["Code Interpreter"], dialog, tools=["code_interpreter"], today=datetime.date(2024, 9, 24)
    )


def test_published_builtin_full_interaction(fmt):
    expected = LLAMA31["Built-in tools full interaction"]
    tool_output = expected.split("ipython<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    dialog = [
        {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
        {"role": "user", "content": "What is the 100th decimal of pi?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("wolfram_alpha", query="100th decimal of pi")],
            "stop_reason": "end_of_message",
        },
        {"role": "tool", "tool_call_id": "call_0", "content": tool_output},
    ]
    assert "π" in tool_output
    assert_published(fmt, expected, dialog)


@pytest.mark.parametrize(
    ("title", "tool_prompt_format"),
    [("JSON based tool calling", "json"), ("`<function>` based tool calling", "function_tag")],
)
def test_published_custom_tools_prompt(fmt, title, tool_prompt_format):
    dialog = [SYSTEM, {"role": "user", "content": "Use tools to get latest trending songs"}]
    assert_published(fmt, LLAMA31[title], dialog, tool_prompt_format, [TRENDING_SONGS], SEPT_21)


def test_published_python_list_prompt(fmt):
    dialog = [{"role": "user", "content": "What is the weather in SF and Seattle?"}]
    assert_published(fmt, LLAMA32["Zero shot function calling"], dialog, "python_list", [GET_WEATHER])


def test_published_python_list_round_trip(fmt):
    """The page's history writes <|python_tag|> before the call, but its model replies to the same
    prompt ("Model Response Format") have none; we encode history as the model writes it."""
    expected = LLAMA32["Zero shot function calling E2E format"].replace("<|python_tag|>", "")
    dialog = [
        {"role": "user", "content": "What is the weather in SF?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("get_weather", city="San Francisco", metric="celsius")],
        },
        {"role": "tool", "content": json.dumps("25 C")},
    ]
    assert_published(fmt, expected, dialog, "python_list", [GET_WEATHER])


def test_python_list_prompt_keeps_builtins_and_system_message(fmt):
    dialog = [{"role": "system", "content": "Answer briefly."}, USER]
    tools = [{"type": "brave_search"}, GET_WEATHER]
    text = fmt.tokenizer.decode(fmt.encode_dialog(dialog, "python_list", tools))
    system = text.split("<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    assert system.startswith("Environment: ipython\nTools: brave_search\nYou are an expert in composing functions.")
    assert system.endswith("\n]\nAnswer briefly.")
    assert "Cutting Knowledge Date" not in system  # the 3.2 layout has no date lines


def test_today_defaults_to_the_real_date(fmt):
    text = fmt.tokenizer.decode(fmt.encode_dialog([USER], tools=[{"type": "brave_search"}]))
    assert f"Today Date: {datetime.date.today().strftime('%d %B %Y')}\n<|eot_id|>" in text


def test_bad_requests_raise(fmt):
    with pytest.raises(ValueError, match="tool prompt format"):
        fmt.encode_dialog([USER], "yaml")
    with pytest.raises(ValueError, match="role"):
        fmt.encode_dialog([{"role": "narrator", "content": "x"}])
    with pytest.raises(ValueError, match="unknown tool"):
        fmt.encode_dialog([USER], tools=[{"type": "retrieval"}])
    with pytest.raises(ValueError, match="query"):
        fmt.encode_dialog([USER, {"role": "assistant", "content": "", "tool_calls": [call("brave_search", q="x")]}])
    # A call in another shape than OpenAI's, or with arguments that are no JSON, says so (it had been a KeyError).
    for calls, message in (([{"name": "f", "arguments": {}}], r"must look like \{'function'"),
                           (["f()"], "must look like"),
                           ([{"function": {"name": "f", "arguments": "{oops"}}], "arguments are no JSON")):
        with pytest.raises(ValueError, match=message):
            fmt.encode_dialog([USER, {"role": "assistant", "content": "", "tool_calls": calls}])


REPLIES = [
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    'wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>',
    '<|python_tag|>photogen.call(query="a cat on a mat")<|eom_id|>',
    "<|python_tag|>def is_prime(n):\n    if n <= 1:\n        return False\n    return True\n\n"
    "print(is_prime(7))<|eom_id|>",
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10",\n'
    '        "genre": "all"\n    }\n}<|eom_id|>',
    '{"name": "get_weather", "parameters": {"city": "SF", "days": 3}}<|eot_id|>',
    '{"type": "function", "name": "brave_search", "parameters": {"q": "weather"}}',
    '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    "<function=spotify_trending_songs>{'n': '5'}</function>",
    '[get_weather(city="San Francisco", metric="celsius")]<|eot_id|>',
    "The 100th decimal of pi is 7.<|eot_id|>",
    "  Padded reply with spaces.  <|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\nWith a header.<|eot_id|>",
    '{"answer": 42, "note": "JSON but not a call"}<|eot_id|>',
    "[1, 2, 3]",
    "Cut off mid-sentence because the budget ran",
    "<function=broken>{not json</function>",
]


def summary(content: str, calls: list[tuple[str, dict]], stop_reason: str | None) -> dict:
    return {"content": content, "calls": calls, "stop_reason": stop_reason}


@pytest.mark.parametrize("reply", REPLIES)
def test_decode_assistant_matches_reference(fmt, meta_fmt, reply):
    ours = fmt.decode_assistant(reply, stop_reason="out_of_tokens")
    theirs = meta_fmt.decode_assistant_message_from_content(reply, StopReason.out_of_tokens)
    assert summary(
        ours["content"],
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in ours["tool_calls"]],
        ours["stop_reason"],
    ) == summary(
        theirs.content,
        [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in theirs.tool_calls],
        theirs.stop_reason.value,
    )
    assert all(c["type"] == "function" and c["id"] for c in ours["tool_calls"])


def test_python_list_reply_with_several_calls(fmt, meta_fmt):
    reply = (
        "[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle', metric='celsius')]<|eot_id|>"
    )
    ours = fmt.decode_assistant(reply)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in ours["tool_calls"]]
    first = meta_fmt.decode_assistant_message_from_content(reply, StopReason.end_of_turn).tool_calls[0]
    assert calls[0] == (first.tool_name, first.arguments)  # the reference keeps only the first
    assert calls[1] == ("get_weather", {"city": "Seattle", "metric": "celsius"})
    assert ours["stop_reason"] == "end_of_turn"
    assert fmt.tokenizer.decode(fmt.encode_message(ours, "python_list")).endswith("\n\n" + reply)  # as written
    # Calls the model did not write (other ids) are encoded as one list, the form Llama 3.2's prompt asks for (the
    # reference writes one list per call, "[get_weather(...)][get_weather(...)]", which its own decoder reads as
    # the first call alone).
    sent = {**ours, "tool_calls": [{**c, "id": f"call_{n}"} for n, c in enumerate(ours["tool_calls"])]}
    ids = fmt.encode_message(sent, "python_list")
    assert fmt.tokenizer.decode(ids).endswith('\n\n[get_weather(city="San Francisco", metric="celsius"), '
                                              'get_weather(city="Seattle", metric="celsius")]<|eot_id|>')


@pytest.mark.parametrize("reply, expected", [
    ("<|python_tag|>[wolfram_alpha()]<|eom_id|>", [("code_interpreter", {"code": "[wolfram_alpha()]"})]),
    ('<|python_tag|>{"name": "photogen", "parameters": {}}<|eom_id|>',
     [("code_interpreter", {"code": '{"name": "photogen", "parameters": {}}'})]),
    ('<function=brave_search>{"q": 5}</function><|eot_id|>', []),
    ('{"name": "code_interpreter", "parameters": {"code": ["print(1)"]}}<|eot_id|>', []),
    ('[get_weather(city="Oslo"), brave_search(q={"a": 1})]<|eot_id|>', []),
    ('<function=brave_search>{"q": "Oslo weather", "n": 3}</function><|eot_id|>',
     [("brave_search", {"query": "Oslo weather"})]),
])
def test_a_builtin_call_without_a_string_argument_is_no_call(fmt, reply, expected):
    """A built-in called in a custom form takes its first argument as its query or code; when that is missing or
    no string the reply is no call to that tool (it had become one that neither the tool could run nor the
    history re-encode: a TypeError or a ValueError when the client sent the conversation back)."""
    message = fmt.decode_assistant(reply)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == expected
    again = fmt.decode_assistant(fmt.encode_message(message)[len(fmt._header("assistant")):])
    assert [c["function"] for c in again["tool_calls"]] == [c["function"] for c in message["tool_calls"]]
    if not expected:
        assert message["content"] == reply.removesuffix("<|eot_id|>")


@pytest.mark.parametrize("reply, expected", [
    ('{"name": "code_interpreter", "parameters": {"language": "python", "code": "print(6*7)"}}<|eom_id|>',
     [("code_interpreter", {"code": "print(6*7)"})]),
    ('<function=brave_search>{"recency": "week", "query": "Nobel prize 2024"}</function><|eom_id|>',
     [("brave_search", {"query": "Nobel prize 2024"})]),
    ('<|python_tag|>{"name": "brave_search", "parameters": {"count": 5, "query": "Paris"}}<|eom_id|>',
     [("brave_search", {"query": "Paris"})]),
    ('<|python_tag|>brave_search.call(query="Paris", count=3)<|eom_id|>', [("brave_search", {"query": "Paris"})]),
    ('<|python_tag|>wolfram_alpha.call(query="say \\"hi\\"")<|eom_id|>', [("wolfram_alpha", {"query": 'say "hi"'})]),
    ('{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}<|eot_id|>',
     [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}<|eom_id|>',
     [("get_weather", {"city": "Paris"})]),
])
def test_calls_read_as_the_model_meant_them(fmt, reply, expected):
    """A built-in's named argument wins over its first one (which had run `{'code': 'python'}`), a built-in call
    with further keywords or escaped quotes is no code to run, and arguments encoded as a JSON string (as OpenAI
    sends them, which models copy) are a call, where they had been content or code for the interpreter."""
    message = fmt.decode_assistant(reply)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == expected


@pytest.mark.parametrize("reply", ["[f(ids={1, 2})]", "<function=f>{'tags': {'a', 'b'}}</function>", '[f(a=b"x")]',
                                   "[f(a=...)]", "[f(a={(1, 2): 3})]", "[f(a=1j)]"])
def test_python_values_json_cannot_carry_are_no_call(fmt, reply):
    # A set, bytes, Ellipsis, a tuple key or a complex number had raised a TypeError out of decode_assistant.
    message = fmt.decode_assistant(reply + "<|eot_id|>")
    assert message["tool_calls"] == [] and message["content"] == reply


def test_a_builtin_call_sent_with_a_non_string_argument_is_refused_by_name(fmt):
    for name, arguments in (("code_interpreter", {"code": 5}), ("brave_search", {"query": {"a": 1}})):
        with pytest.raises(ValueError, match=f"a {name} call needs a string '(code|query)' argument"):
            fmt.encode_message({"role": "assistant", "content": "", "tool_calls": [call(name, **arguments)]})


def test_function_tag_with_nested_arguments(fmt):
    # The reference's regex stops at the first "}" and loses this call; the JSON decoder does not.
    reply = '<function=book>{"guest": {"name": "Ann", "tags": ["vip"]}, "nights": 2}</function>'
    [found] = fmt.decode_assistant(reply)["tool_calls"]
    assert json.loads(found["function"]["arguments"]) == {"guest": {"name": "Ann", "tags": ["vip"]}, "nights": 2}


def test_decode_assistant_from_ids(fmt, tokenizer):
    reply = '<|python_tag|>brave_search.call(query="gold")<|eom_id|><|start_header_id|>garbage after the stop'
    ids = tokenizer.encode(reply, bos=False, allowed_special="all")
    message = fmt.decode_assistant(ids)
    assert message["stop_reason"] == "end_of_message"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("brave_search", {"query": "gold"})
    ]
    assert fmt.decode_assistant(tokenizer.encode("Hi there.<|eot_id|>", bos=False, allowed_special="all")) == {
        "role": "assistant",
        "content": "Hi there.",
        "tool_calls": [],
        "stop_reason": "end_of_turn",
    }
    unfinished = tokenizer.encode("Hi th", bos=False)
    assert fmt.decode_assistant(unfinished)["stop_reason"] == "out_of_tokens"
    assert fmt.decode_assistant(unfinished, stop_reason="end_of_turn")["stop_reason"] == "end_of_turn"
    assert fmt.decode_assistant(tokenizer.encode("done", bos=False) + [128001])["stop_reason"] == "end_of_turn"


def test_encoded_calls_parse_back(fmt):
    calls = [call("search_flights", origin="CDG", passengers=2, flexible=True, stops=None, legs=["a", 'b "q"'])]
    for tool_prompt_format in ("json", "function_tag", "python_list"):
        ids = fmt.encode_message({"role": "assistant", "content": "", "tool_calls": calls}, tool_prompt_format)
        body = fmt.tokenizer.decode(ids).split("<|end_header_id|>\n\n")[1]
        [parsed] = fmt.decode_assistant(body)["tool_calls"]
        assert parsed["function"]["name"] == "search_flights"
        assert json.loads(parsed["function"]["arguments"]) == json.loads(calls[0]["function"]["arguments"])


def published_reply(page: str, title: str) -> str:
    """The "Model Response Format" of one section of Meta's prompt-format page."""
    section = re.split(r"^## ", (LLAMA_MODELS / page).read_text(), flags=re.M)
    [body] = [s for s in section if s.splitlines()[0].strip() == title]
    return re.search(r"##### Model Response Format\n```\n(.*?)\n```", body, re.S)[1]


def as_sent_back(message: dict) -> dict:
    """An assistant message as an OpenAI client returns it: no stop_reason, arguments serialised anew."""
    calls = [{**c, "function": {**c["function"], "arguments": json.dumps(json.loads(c["function"]["arguments"]))}}
             for c in message["tool_calls"]]
    return {"role": "assistant", "content": message["content"] or None, "tool_calls": calls}


@pytest.mark.parametrize(("tool_prompt_format", "reply"), [
    ("json", published_reply("llama3_1/prompt_format.md", "JSON based tool calling")),  # pretty-printed, tag, eom
    ("json", '{"name": "get_weather", "parameters": {"city": "Zürich"}}<|eot_id|>'),  # the tool prompt's own form
    ("json", '{"type":"function","name":"get_weather","arguments":{"city":"Paris"}}<|eom_id|>'),
    ("function_tag", '<function=get_weather>{"city": "Zürich"}</function><|eot_id|>'),
    ("python_list", "[get_weather(city='Paris'), get_weather(city='Oslo')]<|eot_id|>"),
    ("json", '<|python_tag|>brave_search.call(query="gold price")<|eom_id|>'),
])
def test_a_call_sent_back_by_a_client_re_encodes_as_the_model_wrote_it(fmt, tool_prompt_format, reply):
    """A reply decoded to OpenAI calls and sent back by a client (which keeps only names and arguments) is in the
    next prompt as the model wrote it: spacing, key order, escapes, quotes, <|python_tag|> and <|eom_id|>."""
    ids = fmt.tokenizer.encode(reply, bos=False, allowed_special="all")
    ask = [{"role": "user", "content": "Use tools to get latest trending songs"}]
    asked = fmt.encode_dialog(ask, tool_prompt_format)
    message = fmt.decode_assistant(ids)
    assert message["tool_calls"]
    result = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "[]"}
    history = fmt.encode_dialog([*ask, as_sent_back(message), result], tool_prompt_format)
    assert history[:len(asked) + len(ids)] == asked + ids
    # Told otherwise by a message's own stop_reason (Llama Stack's messages carry one), the message wins.
    told = {**as_sent_back(message), "stop_reason": "end_of_turn"}
    assert fmt.encode_message(told, tool_prompt_format)[-1] == fmt.tokenizer.special_tokens["<|eot_id|>"]


def test_a_changed_or_unknown_call_is_written_in_the_format_s_own_form(fmt):
    ids = fmt.tokenizer.encode('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', bos=False,
                               allowed_special="all")
    sent = as_sent_back(fmt.decode_assistant(ids))
    changed = {**sent, "tool_calls": [{**sent["tool_calls"][0], "function": {"name": "get_weather",
                                                                           "arguments": '{"city": "Oslo"}'}}]}
    other = {**sent, "tool_calls": [{**sent["tool_calls"][0], "id": "call_9"}]}
    texted = {**sent, "content": "Checking."}
    for message, text in [(changed, '{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}'),
                          (other, '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}'),
                          (texted, 'Checking.<|python_tag|>{"type": "function", "name": "get_weather", '
                                   '"parameters": {"city": "Paris"}}')]:
        assert fmt.tokenizer.decode(fmt.encode_message(message)).endswith("\n\n" + text + "<|eot_id|>")


def test_a_builtin_call_that_does_not_say_how_it_ended_ends_as_the_model_ends_one(fmt):
    """An OpenAI client's message carries no stop_reason: a built-in call the model did not write here ends with
    <|eom_id|>, as the model ends one (the published full interaction); a custom call with <|eot_id|>."""
    builtin = {"role": "assistant", "content": None, "tool_calls": [call("wolfram_alpha", query="100th decimal of pi")]}
    assert fmt.tokenizer.decode(fmt.encode_message(builtin)).endswith(
        '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>')
    assert fmt.encode_message({**builtin, "stop_reason": "end_of_turn"})[-1] == 128009
    custom = {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="Oslo")]}
    assert fmt.encode_message(custom)[-1] == 128009


def test_only_the_latest_replies_are_remembered():
    from herd.tokenizer.written import WrittenCalls

    written = WrittenCalls(size=2)
    messages = [{"role": "assistant", "content": "", "tool_calls": [call("f", n=n) | {"id": f"call_{n}"}]}
                for n in range(3)]
    for n, message in enumerate(messages):
        written.remember(message, [n])
    assert [written.recall(m) for m in messages] == [None, [1], [2]]
