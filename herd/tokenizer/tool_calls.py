"""Tool calls as Llama 3 writes them, to text and back.

Calls are OpenAI-shaped: {"id", "type": "function", "function": {"name", "arguments": <JSON string>}}.
Built-in tools are written `brave_search.call(query="...")` (code_interpreter: the bare code); custom
tools as JSON, `<function=name>{...}</function>` or a Python list `[name(a=1)]`, by tool prompt format.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
# The built-ins the model calls as `name.call(query="...")`.
QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
TOOL_PROMPT_FORMATS = ("json", "function_tag", "python_list")
# The arguments each built-in takes: never empty, and a query no longer than Brave Search takes (400 characters),
# so that a call forced by a grammar cannot ramble on inside the string until the tokens run out.
BUILTIN_PARAMETERS = {
    **{name: {"type": "object", "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 400}},
              "required": ["query"]} for name in QUERY_TOOLS},
    "code_interpreter": {"type": "object", "properties": {"code": {"type": "string", "minLength": 1}},
                         "required": ["code"]},
}

_BUILTIN_ARGUMENT = {name: spec["required"][0] for name, spec in BUILTIN_PARAMETERS.items()}  # query, or code
_QUERY_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG = re.compile(r"<function=(?P<name>[\w.\-]+)>")

Call = dict[str, Any]


def make_call(name: str, arguments: dict[str, Any]) -> Call:
    """An OpenAI-shaped call; ValueError for arguments that strict JSON cannot carry (NaN, infinity)."""
    return {
        "id": str(uuid.uuid4()),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False, allow_nan=False)},
    }


def call_schema(tools: list[Any], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call in Llama 3.1's JSON form, {"name": ..., "parameters": {...}}, to any of `tools`
    (OpenAI function tools or built-ins, as `LLM.chat` takes them) or to the one called `name`: what decoding
    follows when a call is required (tool_choice "required" or a named function). ValueError for an unknown name, or
    a function no call could be made of (see `check_function`)."""
    options = []
    for tool in tools:
        spec = tool if isinstance(tool, dict) else {"type": tool}
        function = spec.get("function") or {}
        tool_name = function.get("name") if spec.get("type") == "function" else spec.get("type")
        if spec.get("type") == "function":
            check_function(tool_name, function.get("parameters"))
        if name in (None, tool_name):
            # A built-in's own arguments, whatever a function of its name says: a call without them is no call.
            where = f"#/anyOf/{len(options)}/properties/parameters"
            parameters = BUILTIN_PARAMETERS.get(tool_name) or _rebased(function.get("parameters")
                                                                       or {"type": "object"}, where)
            options.append({"type": "object", "properties": {"name": {"const": tool_name}, "parameters": parameters},
                            "required": ["name", "parameters"], "additionalProperties": False})
    if not options:
        raise ValueError(f"tool_choice names '{name}', which is not among the tools" if name else "no tools to call")
    return {"anyOf": options}


def check_function(name: str, parameters: dict[str, Any] | None) -> None:
    """ValueError for an OpenAI function tool no call could be made of: parameters that are no object schema (a call's
    arguments are an object, and OpenAI refuses any other), or a built-in's name on a function of other arguments
    (the model is offered the built-in, and a call of that name is read as the built-in's)."""
    parameters = parameters or {}
    if parameters.get("type", "object") != "object":
        raise ValueError(f"tool {name!r}: its parameters must be an object schema, not of type "
                         f"{parameters['type']!r} (a call's arguments are a JSON object)")
    if name in BUILTIN_TOOLS:
        argument, properties = _BUILTIN_ARGUMENT[name], parameters.get("properties") or {}
        kind = properties[argument].get("type", "string") if isinstance(properties.get(argument), dict) else "string"
        if {*properties, *(parameters.get("required") or ())} - {argument} or kind != "string":
            raise ValueError(f"tool {name!r} is named as a Llama 3.1 built-in, which takes one string {argument!r}: "
                             f"rename the function, or give it no parameters but {argument!r} to offer the built-in")


# The keywords whose values are schemas: one, a list of them, or a map of names to them.
_ONE_SCHEMA = ("items", "additionalProperties", "contains", "propertyNames", "not", "if", "then", "else",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _rebased(schema: Any, where: str) -> Any:
    """`schema` placed at `where` (a JSON pointer) in another document: its references into itself (`#/$defs/...`,
    as pydantic writes a nested model, or `#` for a recursive one) made to point there, where they had pointed into
    the document around it."""
    if not isinstance(schema, dict):
        return schema
    moved, ref = dict(schema), schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        moved["$ref"] = where + ref[1:]
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            moved[key] = {name: _rebased(part, where) for name, part in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            moved[key] = [_rebased(part, where) for part in value]
        elif key in _ONE_SCHEMA:
            moved[key] = _rebased(value, where)
    return moved


def call_arguments(call: Call) -> dict[str, Any]:
    """A call's arguments as a dict (OpenAI sends them as a JSON string)."""
    arguments = call["function"].get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"tool call arguments are no JSON ({error}): {arguments[:60]!r}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments must be a JSON object, got {arguments!r}")
    return arguments


def call_name(call: Call) -> str:
    """The function a call names; a ValueError showing the expected shape for anything else."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError("a tool call must look like {'function': {'name': ..., 'arguments': {...}}}, not "
                         f"{json.dumps(call, default=repr)[:80]}")
    return function["name"]


def call_texts(calls: list[Call], tool_prompt_format: str) -> list[str]:
    """What the model would have written to make `calls`, one piece per call (llama-models tokenizes each call on
    its own, so a piece boundary is a token boundary); custom calls in a Python list are one piece, the list that
    Llama 3.2's prompt asks for (llama-models writes one list per call instead)."""
    named = [(call_name(c), call_arguments(c)) for c in calls]
    if tool_prompt_format == "python_list" and not any(name in BUILTIN_TOOLS for name, _ in named):
        return ["[" + ", ".join(f"{name}({_python_kwargs(args)})" for name, args in named) + "]"]
    return [_call_to_text(name, args, tool_prompt_format) for name, args in named]


def _call_to_text(name: str, arguments: dict[str, Any], tool_prompt_format: str) -> str:
    if name in BUILTIN_TOOLS:
        key = _BUILTIN_ARGUMENT[name]
        if not isinstance(arguments.get(key), str):
            raise ValueError(f"a {name} call needs a string '{key}' argument, got {arguments!r}")
        return arguments[key] if name == "code_interpreter" else f'{name}.call(query="{arguments[key]}")'
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": arguments})
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(arguments)}</function>"
    if tool_prompt_format == "python_list":
        return f"[{name}({_python_kwargs(arguments)})]"
    raise ValueError(f"unknown tool prompt format {tool_prompt_format!r}; expected one of {TOOL_PROMPT_FORMATS}")


def _python_kwargs(arguments: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_python_literal(value)}" for key, value in arguments.items())


def _python_literal(value: Any) -> str:
    # Strings in double quotes, as the reference writes them; JSON escaping keeps them valid Python.
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(_python_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(str(k))}: {_python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def parse_calls(content: str, python_tag: bool) -> list[Call]:
    """The tool calls in an assistant message body; [] when it is not a well-formed call. Never raises.

    Tried in the reference's order: `<function=...>` tags, a JSON call, a Python list of calls,
    `tool.call(query=...)`, and finally, after <|python_tag|>, the body as code for code_interpreter.
    """
    for parse in (_function_tag_calls, _json_call, _python_list_calls, _query_call):
        found = [_as_builtin(name, args) for name, args in parse(content)]
        if None not in found and (calls := _made(found)):
            return calls
    return [make_call("code_interpreter", {"code": content})] if python_tag else []


def parse_custom_calls(content: str) -> list[Call]:
    """Only the `<function=...>` and JSON call forms, which other chat formats' models also write."""
    for parse in (_function_tag_calls, _json_call):
        if calls := _made(parse(content)):
            return calls
    return []


def text_before_calls(content: str) -> str:
    """The text a reply writes before its first `<function=...>` tag, when its calls are in that form: the message's
    content then (the call is not), as a stream has sent that text by the time the tag begins; else ""."""
    tag = _FUNCTION_TAG.search(content)
    return content[: tag.start()] if tag and _function_tag_calls(content) else ""


def _made(found: list[tuple[str, dict[str, Any]]]) -> list[Call]:
    try:
        return [make_call(name, args) for name, args in found]
    except (ValueError, TypeError):  # NaN, a set, bytes... in the arguments: not a call we can hand on as JSON
        return []


def _as_builtin(name: str, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Built-ins called in a custom-tool form take their `query` (or `code`) argument, else their first one (as the
    reference always does); None when that is no string (`wolfram_alpha()`, a number): a call the tool cannot run
    nor history re-encode."""
    if name not in BUILTIN_TOOLS:
        return name, arguments
    key = _BUILTIN_ARGUMENT[name]
    value = arguments[key] if key in arguments else next(iter(arguments.values()), None)
    return (name, {key: value}) if isinstance(value, str) else None


def _function_tag_calls(content: str) -> list[tuple[str, dict[str, Any]]]:
    calls = []
    for tag in _FUNCTION_TAG.finditer(content):
        arguments = _leading_object(content[tag.end() :])
        if arguments is not None:
            calls.append((tag["name"], arguments))
    return calls


def _leading_object(text: str) -> dict[str, Any] | None:
    """The JSON object (or Python dict literal, which models also write) that `text` starts with."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        end = text.find("}</function>")
        value = _literal(text[: end + 1]) if text.startswith("{") and end >= 0 else None
    return value if isinstance(value, dict) else None


def _json_call(content: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        return []
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return []
    arguments = value.get("parameters", value.get("arguments"))
    if isinstance(arguments, str):  # encoded twice, as OpenAI's "arguments" are: models copy that
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return []
    return [(value["name"], arguments)] if isinstance(arguments, dict) else []


def _python_list_calls(content: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        tree = ast.parse(content.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return []
    if not isinstance(tree, ast.List) or not tree.elts:
        return []
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return []
        arguments = {}
        for keyword in node.keywords:
            value = _literal(keyword.value)
            if keyword.arg is None or value is _NOT_LITERAL:
                return []
            arguments[keyword.arg] = value
        calls.append((node.func.id, arguments))
    return calls


_NOT_LITERAL = object()


def _literal(source: str | ast.AST) -> Any:
    try:
        return ast.literal_eval(source)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return _NOT_LITERAL


def _query_call(content: str) -> list[tuple[str, dict[str, Any]]]:
    """`tool.call(query="...")`: the whole body as Python (escaped quotes, further keywords), else found in it."""
    try:
        node = ast.parse(content.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        node = None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
            and isinstance(node.func.value, ast.Name) and not node.args):
        arguments = {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
        if isinstance(arguments.get("query"), str):
            return [(node.func.value.id, {"query": arguments["query"]})]
    found = _QUERY_CALL.search(content)
    return [(found["name"], {"query": found["query"]})] if found else []
