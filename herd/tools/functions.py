"""Tools: custom functions (from Python callables or JSON-schema specs) and the built-ins, behind one interface.

A `Tool` has a name, a description, a JSON schema for its arguments and a function. Calling it validates the
arguments against the schema first (jsonschema), then calls the function; whatever goes wrong — bad arguments,
an exception in the function, a call that outlasts its time limit — comes back as a ToolError whose message the
agent hands to the model.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import importlib
import inspect
import itertools
import json
import os
import sys
import threading
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from herd.tokenizer.tool_calls import BUILTIN_PARAMETERS, BUILTIN_TOOLS
from herd.tools.http import ToolError

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
               type(None): "null"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    function: Callable[..., Any] | None = None
    builtin: bool = False  # one of Llama 3.1's built-ins: named in the system prompt, answered as `ipython`
    enums: dict[str, type[enum.Enum]] = field(default_factory=dict)  # arguments the function takes as Enum members
    positional: tuple[str, ...] = ()  # the function's positional-only parameters: passed by position, in order
    # Seconds a call may run before the model is told it timed out; None: the caller's limit (an Agent's
    # tool_timeout), or none when called directly.
    timeout: float | None = None

    def __post_init__(self):
        check_timeout("timeout", self.timeout)

    @classmethod
    def from_function(cls, function: Callable[..., Any], name: str | None = None,
                      description: str | None = None, timeout: float | None = None) -> Tool:
        """The schema from the signature's type hints and defaults; descriptions from the docstring."""
        import docstring_parser

        doc = docstring_parser.parse(inspect.getdoc(function) or "")
        params = {p.arg_name: p.description for p in doc.params}
        hints = typing.get_type_hints(function)
        properties, required = {}, []
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            schema = _schema(hints.get(parameter.name, Any))
            if parameter.default is None and schema and not _allows_null(schema):
                schema = {"anyOf": [schema, {"type": "null"}]}  # `x: int = None`: None is what it takes by default
            if params.get(parameter.name):
                schema["description"] = params[parameter.name]
            if parameter.default is inspect.Parameter.empty:
                required.append(parameter.name)
            elif _jsonable(parameter.default):
                schema["default"] = parameter.default
            properties[parameter.name] = schema
        summary = " ".join(filter(None, [doc.short_description, doc.long_description]))
        enums = {name: hint for name, hint in hints.items()
                 if name in properties and isinstance(hint, type) and issubclass(hint, enum.Enum)}
        positional = tuple(p.name for p in inspect.signature(function).parameters.values()
                           if p.kind is p.POSITIONAL_ONLY)
        return cls(name or function.__name__, description or summary or function.__name__,
                   {"type": "object", "properties": properties, "required": required}, function, enums=enums,
                   positional=positional, timeout=timeout)

    @classmethod
    def from_schema(cls, spec: dict, function: Callable[..., Any] | None = None) -> Tool:
        """From an OpenAI-shaped tool ({"type": "function", "function": {...}}) or its inner function dict."""
        inner = spec.get("function", spec) if spec.get("type") == "function" else spec
        if not isinstance(inner.get("name"), str):
            raise ValueError(f"a tool spec needs a name: {spec!r}")
        parameters = inner.get("parameters") or {"type": "object", "properties": {}}
        check_parameters(inner["name"], parameters)
        return cls(inner["name"], inner.get("description", ""), parameters, function)

    @classmethod
    def from_spec(cls, spec: str) -> Tool:
        """`package.module:function`, imported (as the CLI's --tools takes custom functions)."""
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"custom tool {spec!r} must be written module:function (built-ins: brave_search, "
                         "wolfram_alpha, code_interpreter)")
        # A module beside the user, as `python -m` and uvicorn find one: the console script's path had left it out.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            target = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import custom tool {spec!r}: {error}") from None
        if isinstance(target, Tool):
            return target
        if not callable(target):
            raise ValueError(f"custom tool {spec!r} is not callable")
        return cls.from_function(target)

    def spec(self) -> dict:
        """What `LLM.chat(tools=...)` takes: the built-in's name, or an OpenAI function tool."""
        if self.builtin:
            return {"type": self.name}
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, arguments: dict[str, Any], timeout: float | None = None) -> Any:
        """The function's value; `timeout` is the limit when the tool sets none of its own."""
        import jsonschema

        if self.function is None:
            raise ToolError(f"tool {self.name!r} has no function to call")
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(self.parameters).iter_errors(arguments))
        if error is not None:
            where = "/".join(map(str, error.absolute_path))
            raise ToolError(f"invalid arguments for {self.name}{f' at {where}' if where else ''}: {error.message}")
        arguments = {k: self.enums[k](v) if k in self.enums else v for k, v in arguments.items()}
        given = list(itertools.takewhile(arguments.__contains__, self.positional))
        args = [arguments.pop(name) for name in given]
        limit = self.timeout if self.timeout is not None else timeout
        try:
            return self._run(args, arguments) if limit is None else self._run_within(limit, args, arguments)
        except ToolError:
            raise
        # SystemExit too (sys.exit in a function had ended the agent's run); not KeyboardInterrupt, the user's stop.
        except (Exception, SystemExit) as error:  # noqa: BLE001 - any failure of the function is the model's to read
            raise ToolError(f"{self.name} raised {type(error).__name__}: {error}") from None

    def _run(self, args: list, kwargs: dict[str, Any]) -> Any:
        value = self.function(*args, **kwargs)
        # An async function's coroutine: the model reads its result, not "<coroutine object ...>".
        return asyncio.run(value) if inspect.iscoroutine(value) else value

    def _run_within(self, limit: float, args: list, kwargs: dict[str, Any]) -> Any:
        """The call in a thread of its own, waited for `limit` seconds: a function that never returned had held the
        agent's turn (and, over HTTP, its session) for ever."""
        outcome: dict[str, Any] = {}

        def target():
            try:
                outcome["value"] = self._run(args, kwargs)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread, where it is judged
                outcome["error"] = error

        # A daemon, and left running when the limit passes: Python cannot stop a thread, and a daemon one at
        # least does not keep the process alive at exit. Whatever it holds (a socket, a lock) stays held until
        # the function returns by itself.
        worker = threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True,
                                  name=f"tool {self.name}")
        worker.start()
        worker.join(limit)
        if worker.is_alive():
            raise ToolError(f"{self.name} did not finish within its time limit of {limit:g} s; its call was given up")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


def builtin_tool(name: str, **options) -> Tool:
    """brave_search, wolfram_alpha or code_interpreter as a Tool; `options` go to its backend."""
    if name == "brave_search":
        from herd.tools.search import BraveSearch

        search = BraveSearch(**options)
        return Tool(name, f"web search ({search.backend})", BUILTIN_PARAMETERS[name], lambda query: search(query),
                    builtin=True)
    if name == "wolfram_alpha":
        from herd.tools.math import WolframAlpha

        math = WolframAlpha(**options)
        return Tool(name, f"math ({math.backend})", BUILTIN_PARAMETERS[name], lambda query: math(query), builtin=True)
    if name == "code_interpreter":
        from herd.tools.sandbox import run_python

        # 30 s by default: importing matplotlib or pandas alone can take seconds on a busy machine.
        options = {"timeout": 30, **options}
        return Tool(name, "runs Python in a sandbox", BUILTIN_PARAMETERS[name],
                    lambda code: run_python(code, **options), builtin=True)
    raise ValueError(f"unknown built-in tool {name!r}: herd runs brave_search, wolfram_alpha and code_interpreter")


def check_parameters(name: str, parameters: dict) -> None:
    """ValueError unless a tool's `parameters` are a JSON Schema (its arguments are validated against them) within
    the limits a schema enforced while decoding has (a call demanded by tool_choice is)."""
    import jsonschema

    from herd.generate.structured import GrammarError, check_schema_size

    try:
        # First: jsonschema's check recurses, and a schema 100 levels deep overflowed Python's stack.
        check_schema_size(parameters)
    except GrammarError as error:
        raise ValueError(f"tool {name!r}'s parameter schema is too large: {error}") from None
    try:
        jsonschema.Draft202012Validator.check_schema(parameters)
    except jsonschema.SchemaError as error:
        raise ValueError(f"tool {name!r} has an invalid parameter schema: {error.message}") from None


def as_tool(item: Tool | str | dict | Callable[..., Any]) -> Tool:
    """A Tool from a Tool, a built-in's name, a `module:function` spec, an OpenAI spec dict or a callable."""
    if isinstance(item, Tool):
        return item
    if isinstance(item, str):
        return builtin_tool(item) if item in BUILTIN_TOOLS else Tool.from_spec(item)
    if isinstance(item, dict):
        return Tool.from_schema(item)
    if callable(item):
        name = getattr(item, "name", None)
        if name in BUILTIN_TOOLS:  # a configured BraveSearch / WolframAlpha instance
            return Tool(name, name, BUILTIN_PARAMETERS[name], lambda query: item(query), builtin=True)
        return Tool.from_function(item)
    raise ValueError(f"cannot make a tool from {item!r}")


def parse_tools(text: str) -> list[Tool]:
    """`brave_search,wolfram_alpha,code_interpreter,pkg.mod:function` (the CLI's --tools)."""
    return [as_tool(part.strip()) for part in text.split(",") if part.strip()]


def result_text(value: Any) -> str:
    """A tool's result as the text the model reads."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "files" in value and isinstance(value["files"], dict):  # run_python's result
        value = {**value, "files": {name: f"<{len(data)} bytes>" for name, data in value["files"].items()}}
    return json.dumps(value, ensure_ascii=False, default=str)


def _schema(hint: Any) -> dict:
    """JSON schema for a type hint: builtins, Optional/Union, list[...] / dict[...], Literal, Enum."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return {}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [_schema(a) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {"anyOf": [schema, {"type": "null"}]} if type(None) in args else schema
    if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed length, each place its own type
        places = [_schema(a) for a in args]
        return {"type": "array", "prefixItems": places, "minItems": len(places), "maxItems": len(places)}
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        items = _schema(args[0]) if args else {}
        return {"type": "array", **({"items": items} if items else {})}
    if origin is dict or hint is dict:
        return {"type": "object", **({"additionalProperties": _schema(args[1])} if len(args) == 2 else {})}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [member.value for member in hint]}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise ValueError(f"cannot describe the type {hint!r} in JSON schema; use str, int, float, bool, list, dict, "
                     "Literal or an Enum")


def check_timeout(name: str, value: float | None) -> None:
    """ValueError unless `value` is a time limit: seconds, more than none and not infinite; or None, no limit."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                              or value == float("inf")):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")


def _allows_null(schema: dict) -> bool:
    import jsonschema

    return jsonschema.Draft202012Validator(schema).is_valid(None)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
