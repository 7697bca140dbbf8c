"""Custom function tools: schemas from signatures and docstrings, validation before the call, errors as text."""
import enum
from typing import Literal, Optional

import jsonschema
import pytest

from herd.tools import Tool, ToolError, as_tool, parse_tools


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(city: str, days: int = 1, unit: Unit = Unit.CELSIUS, hourly: bool = False,
                fields: Optional[list[str]] = None) -> dict:
    """Get the weather forecast for a city.

    Args:
        city: The city's name, e.g. Paris.
        days: How many days ahead.
        unit: Temperature unit.
        hourly: One entry per hour instead of per day.
        fields: Which fields to return.
    """
    return {"city": city, "days": days, "unit": unit}


def test_schema_from_signature_and_docstring():
    tool = Tool.from_function(get_weather)
    assert tool.name == "get_weather" and tool.description == "Get the weather forecast for a city."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city's name, e.g. Paris."},
            "days": {"type": "integer", "description": "How many days ahead.", "default": 1},
            "unit": {"enum": ["celsius", "fahrenheit"], "description": "Temperature unit."},
            "hourly": {"type": "boolean", "description": "One entry per hour instead of per day.", "default": False},
            "fields": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                       "description": "Which fields to return.", "default": None},
        },
        "required": ["city"],
    }
    jsonschema.Draft202012Validator.check_schema(tool.parameters)
    assert tool.spec() == {"type": "function", "function": {"name": "get_weather", "description": tool.description,
                                                            "parameters": tool.parameters}}


def test_arguments_are_validated_before_the_call():
    calls = []
    tool = Tool.from_function(lambda mode, n: calls.append((mode, n)) or n, name="f")
    typed = Tool.from_function(get_weather)
    assert typed({"city": "Paris", "days": 3}) == {"city": "Paris", "days": 3, "unit": Unit.CELSIUS}
    assert typed({"city": "Paris", "unit": "fahrenheit"})["unit"] is Unit.FAHRENHEIT
    with pytest.raises(ToolError, match="invalid arguments for get_weather: 'city' is a required property"):
        typed({"days": 3})
    with pytest.raises(ToolError, match="invalid arguments for get_weather at days: 'three' is not of type 'integer'"):
        typed({"city": "Paris", "days": "three"})
    with pytest.raises(ToolError, match="at unit: 'kelvin' is not one of"):
        typed({"city": "Paris", "unit": "kelvin"})
    with pytest.raises(ToolError, match=r"at fields/1"):
        typed({"city": "Paris", "fields": ["temp", 3]})
    assert tool({"mode": "x", "n": 2}) == 2 and calls == [("x", 2)]


def test_exceptions_become_tool_errors():
    def divide(a: float, b: float) -> float:
        """Divide a by b."""
        return a / b

    tool = as_tool(divide)
    assert tool({"a": 1, "b": 4}) == 0.25
    with pytest.raises(ToolError, match="divide raised ZeroDivisionError: division by zero"):
        tool({"a": 1, "b": 0})


def test_json_schema_tools():
    spec = {"type": "function", "function": {"name": "lookup", "description": "Look a word up.", "parameters": {
        "type": "object", "properties": {"word": {"type": "string", "minLength": 2}}, "required": ["word"]}}}
    tool = Tool.from_schema(spec, lambda word: word.upper())
    assert tool.spec() == spec
    assert tool({"word": "hi"}) == "HI"
    with pytest.raises(ToolError, match="'a' is too short"):
        tool({"word": "a"})
    with pytest.raises(ToolError, match="has no function"):
        Tool.from_schema(spec)({"word": "hi"})
    with pytest.raises(ValueError, match="invalid parameter schema"):
        Tool.from_schema({"name": "bad", "parameters": {"type": "nonsense"}})


def test_module_function_specs(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text("def get_weather(city: str, days: int = 1) -> dict:\n"
                                          "    return {'city': city, 'days': days}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("BRAVE_API_KEY", "test-key")
    [search, wolfram, code, weather] = parse_tools("brave_search, wolfram_alpha,code_interpreter,my_tools:get_weather")
    assert [t.builtin for t in (search, wolfram, code, weather)] == [True, True, True, False]
    assert [t.spec() for t in (search, wolfram, code)] == [{"type": "brave_search"}, {"type": "wolfram_alpha"},
                                                          {"type": "code_interpreter"}]
    assert weather.name == "get_weather" and weather({"city": "Oslo"}) == {"city": "Oslo", "days": 1}
    with pytest.raises(ValueError, match="must be written module:function"):
        as_tool("nonsense")
    with pytest.raises(ValueError, match="cannot import custom tool 'no_such_module:f'"):
        as_tool("no_such_module:f")
    monkeypatch.delenv("BRAVE_API_KEY")
    monkeypatch.delenv("HERD_SEARCH_COLLECTION", raising=False)
    with pytest.raises(ToolError, match="brave_search needs an API key"):
        as_tool("brave_search")


def test_literal_and_unsupported_types():
    def pick(color: Literal["red", "green"], weight: float = 1.0) -> str:
        return color

    assert Tool.from_function(pick).parameters["properties"]["color"] == {"enum": ["red", "green"]}
    with pytest.raises(ValueError, match="cannot describe the type"):
        Tool.from_function(_takes_object)


def _takes_object(value: object) -> None:
    pass


def test_tuples_defaults_of_none_positional_only_and_async_functions():
    def odd(x: int, /, pair: tuple[int, str], limit: int = None) -> list:
        return [x, pair, limit]

    async def later(x: int) -> int:
        return x + 1

    tool = Tool.from_function(odd)
    assert tool.parameters["properties"]["pair"] == {"type": "array", "prefixItems": [{"type": "integer"},
                                                     {"type": "string"}], "minItems": 2, "maxItems": 2}
    assert tool({"x": 1, "pair": [2, "b"], "limit": None}) == [1, [2, "b"], None]
    with pytest.raises(ToolError, match="at pair/1: 3 is not of type 'string'"):
        tool({"x": 1, "pair": [2, 3]})
    assert Tool.from_function(later)({"x": 1}) == 2


def test_a_custom_tool_beside_the_user_is_found(tmp_path):
    """`herd serve --tools my_module:get_weather` with my_module.py in the current directory, as the README shows:
    the console script's path lacks that directory, and the import had failed."""
    import subprocess
    import sys

    (tmp_path / "my_module.py").write_text("def get_weather(city: str) -> str:\n    return 'sunny in ' + city\n")
    code = ("from herd.tools.functions import Tool\n"
            "print(Tool.from_spec('my_module:get_weather')({'city': 'Paris'}))\n")
    # -P: no script directory on the path, as the `herd` console script runs
    done = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "sunny in Paris", done.stderr
