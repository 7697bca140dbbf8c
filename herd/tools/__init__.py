"""Tools a Llama 3.1 model calls: the sandboxed code interpreter, search, math, and custom functions."""

from herd.tools.sandbox import Limits, run_python, sandbox_problem

__all__ = ["Limits", "run_python", "sandbox_problem"]
