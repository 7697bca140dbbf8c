"""Tools a Llama 3.1 model calls: the sandboxed code interpreter, search, math, and custom functions."""

from herd.tools.functions import Tool, as_tool, builtin_tool, parse_tools
from herd.tools.http import ToolError
from herd.tools.math import WolframAlpha
from herd.tools.sandbox import Limits, run_python, sandbox_problem
from herd.tools.search import BraveSearch

__all__ = ["BraveSearch", "Limits", "Tool", "ToolError", "WolframAlpha", "as_tool", "builtin_tool", "parse_tools",
           "run_python", "sandbox_problem"]
