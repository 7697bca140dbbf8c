"""The prompts that tell a Llama 3.1 / 3.2 model which tools it has.

The wording follows Meta's prompt templates (llama-models' `prompt_templates/system_prompts.py` and the
published 3.1 / 3.2 prompt-format pages) character for character, because the models were tuned on it.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from herd.tokenizer.content import content_texts
from herd.tokenizer.tool_calls import BUILTIN_TOOLS

Message = dict[str, Any]

_JSON_INTRO = (
    "Answer the user's question by making use of the following functions if needed.\n"
    "If none of the function can be used, please say so.\n"
    "Here is a list of functions in JSON format:\n"
)
_JSON_OUTRO = "\nReturn function calls in JSON format."

_FUNCTION_TAG_INTRO = "You have access to the following functions:\n\n"
_FUNCTION_TAG_OUTRO = """\
Think very carefully before calling functions.
If you choose to call a function ONLY reply in the following format with no prefix or suffix:

<function=example_function_name>{"example_name": "example_value"}</function>

Reminder:
- If looking for real time information use relevant functions before falling back to brave_search
- Function calls MUST follow the specified format, start with <function= and end with </function>
- Required parameters MUST be specified
- Only call one function at a time
- Put the entire function call reply on one line"""

_PYTHON_LIST_INTRO = """\
You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the function can be used, point it out. If the given question lacks the parameters required by the function,
also point it out. You should only return the function call in tools call sections.

If you decide to invoke any of the function(s), you MUST put it in the format of \
[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
You SHOULD NOT include any other text in the response.

Here is a list of functions in JSON format that you can invoke.

"""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    description: str | None
    required: bool
    default: Any = None


@dataclass(frozen=True)
class CustomTool:
    name: str
    description: str
    params: tuple[Param, ...]


def with_tool_prompts(
    messages: list[Message], tools: list[Any], tool_prompt_format: str, today: datetime.date | None = None
) -> list[Message]:
    """`messages` with the tool instructions added, as Meta's reference stacks them.

    `tools` holds OpenAI-shaped tools ({"type": "function", "function": {"name", "description",
    "parameters"}}) and built-ins ({"type": "brave_search"}, or a function / plain name that is one).
    json and function_tag (Llama 3.1) put the built-ins and the date in the system prompt and the custom
    tools in a user message after it; python_list (Llama 3.2) puts everything in the system prompt.
    """
    builtins, custom = _split_tools(tools)
    system, rest = (messages[0], messages[1:]) if messages and messages[0]["role"] == "system" else (None, messages)
    instruction = "".join(content_texts(system["content"])) if system else None
    if tool_prompt_format == "python_list":
        parts = [_environment(builtins) if builtins else "", _python_list_prompt(custom) if custom else ""]
        content = "\n".join(p for p in [*parts, instruction or ""] if p).strip("\n")
        return [{"role": "system", "content": content}, *rest]

    today = today or datetime.date.today()
    content = _environment(builtins) + "\n" if builtins or custom else ""
    content += f"Cutting Knowledge Date: December 2023\nToday Date: {today.strftime('%d %B %Y')}"
    if instruction:
        content += "\n\n" + instruction
    prompt = [{"role": "system", "content": content + "\n"}]
    if custom:
        render = _json_prompt if tool_prompt_format == "json" else _function_tag_prompt
        prompt.append({"role": "user", "content": render(custom)})
    return [*prompt, *rest]


def _split_tools(tools: list[Any]) -> tuple[list[str], list[CustomTool]]:
    builtins: list[str] = []
    custom: list[CustomTool] = []
    for tool in tools:
        spec = tool if isinstance(tool, dict) else {"type": tool}
        function = spec.get("function") or {}
        name = function.get("name") if spec.get("type") == "function" else spec.get("type")
        if name in BUILTIN_TOOLS:
            builtins.append(name)
        elif spec.get("type") == "function" and isinstance(name, str):
            custom.append(_custom_tool(function))
        else:
            raise ValueError(f"unknown tool {tool!r}: expected an OpenAI function tool or one of {BUILTIN_TOOLS}")
    return builtins, custom


def _custom_tool(function: dict[str, Any]) -> CustomTool:
    schema = function.get("parameters") or {}
    properties = (schema.get("properties") or {}) if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        raise ValueError(f"tool {function['name']!r}: its parameters must be a JSON Schema object with an object "
                         f"of properties, not {schema!r}")
    required = set(schema.get("required", ()))
    # A property's schema may be `true` (anything goes), which JSON Schema allows.
    params = tuple(
        Param(name, str(p.get("type", "any")), p.get("description"), name in required, p.get("default"))
        for name, p in ((name, p if isinstance(p, dict) else {}) for name, p in properties.items())
    )
    return CustomTool(function["name"], function.get("description") or "", params)


def _environment(builtins: list[str]) -> str:
    """'Environment: ipython' (which alone enables the code interpreter) and the other built-ins by name."""
    named = [b for b in builtins if b != "code_interpreter"]
    return "Environment: ipython\n" + (f"Tools: {', '.join(named)}" if named else "")


def _tojson(value: Any) -> str:
    """Jinja's `tojson` filter, which the reference templates use: sorted keys, HTML-safe."""
    text = json.dumps(value, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


def _json_prompt(tools: list[CustomTool]) -> str:
    # Laid out by hand, as the reference does, down to the list-of-objects "properties".
    blocks = []
    for t in tools:
        props = ",".join(
            f'\n                {{\n                    "{p.name}": {{\n                        "type": "object",\n'
            f'                        "description": "{p.description}"\n                    }}\n                }}'
            for p in t.params
        )
        blocks.append(
            f'{{\n    "type": "function",\n    "function": {{\n        "name": "{t.name}",\n'
            f'        "description": "{t.description}",\n        "parameters": {{\n'
            f'            "type": "object",\n            "properties": [{props}\n            ],\n'
            f'            "required": {_tojson([p.name for p in t.params if p.required])}\n'
            f"        }}\n    }}\n}}\n"
        )
    return _JSON_INTRO + "".join(blocks) + _JSON_OUTRO


def _function_tag_prompt(tools: list[CustomTool]) -> str:
    blocks = []
    for t in tools:
        params = {
            p.name: {"description": p.description, "param_type": p.type, "required": p.required} for p in t.params
        }
        blocks.append(
            f"Use the function '{t.name}' to '{t.description}':\n"
            f'{{"name": "{t.name}", "description": "{t.description}", "parameters": {_tojson(params)}}}\n\n'
        )
    return _FUNCTION_TAG_INTRO + "".join(blocks) + _FUNCTION_TAG_OUTRO


def _python_list_prompt(tools: list[CustomTool]) -> str:
    # Pretty-printed JSON, as on Meta's Llama 3.2 prompt-format page.
    listing = [
        {
            "name": t.name,
            "description": t.description,
            "parameters": {
                "type": "dict",
                "required": [p.name for p in t.params if p.required],
                "properties": {
                    p.name: {"type": p.type, "description": p.description}
                    | ({"default": p.default} if p.default is not None else {})
                    for p in t.params
                },
            },
        }
        for t in tools
    ]
    return _PYTHON_LIST_INTRO + json.dumps(listing, indent=4, ensure_ascii=False)
