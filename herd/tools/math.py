"""wolfram_alpha: the Wolfram|Alpha Full Results API when an app id is configured, else SymPy (and pint for units).

The offline backend reads natural-ish queries: arithmetic ("what is 2^10 + 3*7", "15% of 80"), algebra ("solve
x^2 - 4 = 0", "solve x + y = 3, x - y = 1", "factor x^2 - 1"), calculus ("derivative of x^2 sin(x)",
"integrate x^2 from 0 to 1", "limit of sin(x)/x as x -> 0") and unit conversion ("convert 5 miles to km",
"100 fahrenheit in celsius", "how many feet in a mile"). The query is checked against a whitelist of names and
characters before SymPy parses it (its parser evaluates Python), and sizes that would never finish are refused.
Anything else is a ToolError saying what it can answer.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import resource
import tokenize

from herd.tools.http import ToolError, get_json

WOLFRAM_URL = "https://api.wolframalpha.com/v2"
_MAX_QUERY = 300
_MAX_EXPONENT = 10_000
_CHILD_MEMORY = 2 << 30

_FUNCTIONS = {
    "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh",
    "atanh", "exp", "log", "ln", "sqrt", "cbrt", "abs", "factorial", "binomial", "gcd", "lcm", "floor", "ceiling",
    "pi", "E", "I", "oo", "Abs", "gamma", "erf", "mod", "Mod",
}
_ALIASES = {"infinity": "oo", "inf": "oo", "e": "E", "ln": "log", "π": "pi", "√": "sqrt ", "×": "*", "÷": "/",
            "−": "-", "²": "^2", "³": "^3", "mod": "Mod", "abs": "Abs", "i": "I"}
_TIMES_X = re.compile(r"(?<=\d)\s*[xX]\s*(?=\d)")
_WORDS = [(re.compile(rf"\b{words}\b", re.I), symbol) for words, symbol in [
    (r"square\s+root\s+of", "sqrt "), (r"cube\s+root\s+of", "cbrt "), (r"to\s+the\s+power\s+of", "^"),
    (r"squared", "^2"), (r"cubed", "^3"), (r"(?:multiplied\s+by|times)", "*"), (r"(?:divided\s+by|over)", "/"),
    (r"plus", "+"), (r"minus", "-"), (r"factorial\s+of", "factorial "), (r"(?:the\s+)?(?:sine|sin)\s+of", "sin "),
    (r"(?:the\s+)?(?:cosine|cos)\s+of", "cos "), (r"(?:natural\s+)?(?:logarithm|log)\s+of", "log "),
]]
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_NUMBER = re.compile(r"(?<![A-Za-z_])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")
_ALLOWED_CHARS = re.compile(r"^[\w\s+\-*/^().,=<>!%]*$")


class WolframAlpha:
    """`WolframAlpha()(query)`: the real API with `app_id` (or $WOLFRAM_ALPHA_APP_ID), else SymPy offline."""

    name = "wolfram_alpha"

    def __init__(self, app_id: str | None = None, *, base_url: str | None = None, timeout: float = 10.0):
        """timeout: seconds for the API's answer, or for SymPy's (which can take forever on hard input)."""
        self.app_id = app_id or os.environ.get("WOLFRAM_ALPHA_APP_ID")
        self.base_url = (base_url or os.environ.get("WOLFRAM_ALPHA_BASE_URL") or WOLFRAM_URL).rstrip("/")
        self.timeout = timeout

    @property
    def backend(self) -> str:
        return "wolfram" if self.app_id else "sympy"

    def __call__(self, query: str) -> dict:
        query = query.strip()
        if not query:
            raise ToolError("wolfram_alpha needs a non-empty query")
        if self.app_id:
            return self._api(query)
        _warm_up()
        return {"query": query, **_in_child(solve_offline, query, self.timeout)}

    def _api(self, query: str) -> dict:
        body = get_json(f"{self.base_url}/query", {"input": query, "appid": self.app_id, "format": "plaintext",
                                                   "output": "json"},
                        headers={}, timeout=self.timeout, service="Wolfram|Alpha")
        result = body.get("queryresult") or {}
        if not result.get("success"):
            tips = (result.get("tips") or {}).get("text", "")
            raise ToolError(f"Wolfram|Alpha did not understand {query!r}" + (f": {tips}" if tips else ""))
        pods = [{"title": pod.get("title", ""),
                 "text": "\n".join(s.get("plaintext", "") for s in pod.get("subpods", []) if s.get("plaintext"))}
                for pod in result.get("pods", [])]
        return {"query": query, "pods": [p for p in pods if p["text"]]}


def _in_child(function, query: str, timeout: float) -> dict:
    """`function(query)` in a forked child, killed after `timeout` s: SymPy may not finish and cannot be stopped."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_answer_into, args=(send, function, query), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise ToolError(f"no answer to {query!r} within {timeout:g} s")
        ok, value = receive.recv()
    except EOFError:
        raise ToolError(f"the math backend died on {query!r}") from None
    finally:
        child.kill()
        child.join()
    if not ok:
        raise ToolError(value)
    return value


@functools.cache
def _warm_up() -> None:
    """Load pint's units and SymPy's lazily imported parts once, here, rather than in every forked child."""
    _units()
    for query in ("solve x^2 = 1", "limit of sin(x)/x as x -> 0", "integrate x from 0 to 1", "d/dx x^2"):
        solve_offline(query)


def _address_space() -> int:
    """This process's mapped bytes: a forked child inherits them, so its memory cap goes on top of them."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:
        return 0


def _answer_into(send, function, query: str) -> None:
    limit = _address_space() + _CHILD_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        send.send((True, function(query)))
    except ToolError as error:
        send.send((False, str(error)))
    except (ValueError, TypeError) as error:  # TypeError: what SymPy raises on a form it cannot take
        big = "digits" in str(error)  # Python's cap on converting huge integers to text
        send.send((False, f"the answer to {query!r} is too large to write out" if big
                   else f"cannot answer {query!r}: {error}"))
    except NotImplementedError:  # SymPy's way of saying it has no method (an integral, a limit, ...)
        send.send((False, f"cannot solve {query!r}: SymPy has no method for it"))
    except (MemoryError, RecursionError, OverflowError) as error:
        send.send((False, f"cannot answer {query!r}: it is too large ({type(error).__name__})"))


# --- the offline backend ---------------------------------------------------------------------------------

_LEAD = re.compile(r"^(please\s+)?(what\s+is|what's|whats|calculate|compute|evaluate|find|give\s+me|tell\s+me)\s+"
                   r"(the\s+)?(value\s+of\s+)?", re.I)
_DERIVATIVE = re.compile(r"^(?:the\s+)?(?:derivative|differentiate|diff|d/d(?P<dvar>[a-z]))\s*(?:of\s+)?(?P<expr>.+?)"
                         r"(?:\s+(?:with\s+respect\s+to|wrt|by)\s+(?P<var>[a-z]))?$", re.I)
_INTEGRAL = re.compile(r"^(?:the\s+)?(?:integral|integrate|antiderivative)\s*(?:of\s+)?(?P<expr>.+?)"
                       r"(?:\s*d(?P<dvar>[a-z]))?(?:\s+(?:with\s+respect\s+to|wrt)\s+(?P<var>[a-z]))?"
                       r"(?:\s+from\s+(?P<low>.+?)\s+to\s+(?P<high>.+?))?$", re.I)
_LIMIT = re.compile(r"^(?:the\s+)?(?:limit|lim)\s*(?:of\s+)?(?P<expr>.+?)\s+as\s+(?P<var>[a-z])\s*"
                    r"(?:->|→|approaches|goes\s+to|tends\s+to|to)\s*(?P<point>.+?)$", re.I)
_SOLVE = re.compile(r"^(?:solve|roots?\s+of|zeros?\s+of)\s+(?P<eqs>.+?)(?:\s+for\s+(?P<vars>[a-z](?:\s*,\s*[a-z])*))?$",
                    re.I)
_REWRITE = re.compile(r"^(?P<op>simplify|factor|factorise|factorize|expand)\s+(?P<expr>.+)$", re.I)
# "20% of 50 + 10": the percentage of the number (or bracket) after "of", not of the rest of the query
_PERCENT_OF = re.compile(r"(?P<p>\d+(?:\.\d+)?)\s*%\s*of\s+(?P<x>\d+(?:\.\d+)?|\([^()]*\))", re.I)
_HOW_MANY = re.compile(r"^how\s+many\s+(?P<dst>.+?)\s+(?:are\s+)?(?:in|per)\s+(?:an?\s+|one\s+)?(?P<src>.+)$", re.I)
_CONVERT = re.compile(r"^(?:convert\s+)?(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?)?\s*(?P<src>[^\d].*?)\s+"
                      r"(?:to|in|into|as)\s+(?P<dst>.+)$", re.I)


def solve_offline(query: str) -> dict:
    """{"input": how it was read, "result": exact, "decimal": approximate (when it differs)}; ToolError if not."""
    text = query.strip().rstrip("?").strip()
    text = _LEAD.sub("", text[:-1] if text.endswith(".") and not text[-2:-1].isdigit() else text)
    text = _PERCENT_OF.sub(lambda m: f"({m['p']}/100*{m['x']})", text)
    if converted := _convert_units(text):
        return converted
    import sympy

    if m := _LIMIT.match(text):
        x = sympy.Symbol(m["var"])
        point = _parse(m["point"])
        try:  # from both sides, as "the limit" means, unless the point is an infinity
            expr = sympy.limit(_parse(m["expr"]), x, point, dir="+-" if point.is_finite else "+")
        except ValueError:
            raise ToolError(f"the limit of {m['expr']} as {m['var']} -> {m['point']} does not exist "
                            "(the one-sided limits differ)") from None
        if isinstance(expr, sympy.AccumBounds):
            raise ToolError(f"the limit of {m['expr']} as {m['var']} -> {m['point']} does not exist (it oscillates "
                            f"between {expr.min} and {expr.max})")
        if expr is sympy.zoo:
            raise ToolError(f"the limit of {m['expr']} as {m['var']} -> {m['point']} does not exist (it grows "
                            "without bound, with different signs on each side)")
        return _answer(f"limit of {m['expr']} as {m['var']} -> {m['point']}", expr)
    if m := _DERIVATIVE.match(text):
        expr = _parse(m["expr"])
        x = sympy.Symbol(m["dvar"] or m["var"]) if (m["dvar"] or m["var"]) else _main_symbol(expr)
        return _answer(f"d/d{x} {expr}", sympy.simplify(sympy.diff(expr, x)))
    if m := _INTEGRAL.match(text):
        expr = _parse(m["expr"])
        x = sympy.Symbol(m["dvar"] or m["var"]) if (m["dvar"] or m["var"]) else _main_symbol(expr)
        if m["low"] is not None:
            low, high = _parse(m["low"]), _parse(m["high"])
            return _answer(f"integral of {expr} d{x} from {low} to {high}", sympy.integrate(expr, (x, low, high)))
        return _answer(f"integral of {expr} d{x}", sympy.integrate(expr, x), suffix=" + C")
    if m := _SOLVE.match(text):
        return _solve(m["eqs"], m["vars"])
    if m := _REWRITE.match(text):
        expr = _parse(m["expr"])
        if m["op"].lower().startswith("factor") and expr.is_Integer and abs(expr) > 1:  # sympy.factor leaves 360
            primes = sympy.factorint(expr)
            written = " * ".join(f"{p}^{k}" if k > 1 else str(p) for p, k in primes.items())
            return {"input": f"prime factorization of {expr}",
                    "result": f"{written} (a prime)" if list(primes.values()) == [1] and expr > 0 else written}
        op = {"simplify": sympy.simplify, "expand": sympy.expand}.get(m["op"].lower(), sympy.factor)
        return _answer(f"{m['op'].lower()} {m['expr']}", op(expr))
    if "=" in text:
        return _solve(text, None)
    expr = _parse(text)
    # simplified with or without a variable: (1+2i)(3-i) is 5 + 5i, log(8)/log(2) is 3
    return _answer(text, expr if expr.is_Atom else sympy.simplify(expr))


def _solve(equations: str, variables: str | None) -> dict:
    import sympy

    eqs = []
    for part in re.split(r"\s*(?:,|;|\band\b)\s*", equations):
        if not part:
            continue
        sides = part.split("=")
        if len(sides) > 2:
            raise ToolError(f"cannot read the equation {part!r}")
        eqs.append(sympy.Eq(_parse(sides[0]), _parse(sides[1])) if len(sides) == 2 else _parse(part))
    if any(e is sympy.false for e in eqs):  # x + 1 = x
        return {"input": f"solve {equations}", "result": "no solution"}
    eqs = [e for e in eqs if e is not sympy.true]
    symbols = ([sympy.Symbol(v.strip()) for v in variables.split(",")] if variables
               else sorted(set().union(*(e.free_symbols for e in eqs)), key=str))
    if not eqs:  # 2 + 3 = 5, or x = x
        return {"input": equations, "result": "true"}
    if not symbols:
        raise ToolError(f"nothing to solve for in {equations!r}")
    if len(eqs) == 1 and len(symbols) == 1 and isinstance(eqs[0], sympy.core.relational.Relational) \
            and not isinstance(eqs[0], sympy.Eq):  # an inequality: a set of intervals, not roots
        solved = sympy.solve_univariate_inequality(eqs[0], symbols[0])
        return {"input": f"solve {equations} for {symbols[0]}",
                "result": str(solved).replace(" & ", " and ").replace(" | ", " or ")}
    try:
        if len(eqs) == 1 and len(symbols) == 1:
            # solve([eq], [x], dict=True) drops the CRootOf roots of polynomials with no radical form (x^5 - x + 1);
            # solve(eq, x) keeps them.
            solutions = [{symbols[0]: root} for root in sympy.solve(eqs[0], symbols[0])]
        else:
            solutions = sympy.solve(eqs, symbols, dict=True)
    except NotImplementedError:
        raise ToolError(f"cannot solve {equations!r}: SymPy has no method for it") from None
    if not solutions:
        return {"input": f"solve {equations}", "result": "no solution"}
    exact = "; ".join(", ".join(f"{k} = {v}" for k, v in s.items()) for s in solutions)
    approx = "; ".join(", ".join(f"{k} ≈ {_decimal(v)}" for k, v in s.items()) for s in solutions)
    return {"input": f"solve {equations} for {', '.join(map(str, symbols))}", "result": exact,
            **({"decimal": approx} if approx.replace("≈", "=") != exact else {})}


def _answer(read_as: str, value, suffix: str = "") -> dict:
    import sympy

    if isinstance(value, sympy.Basic) and value.has(sympy.Limit, sympy.Integral, sympy.Derivative):
        raise ToolError(f"no closed form found for {read_as}")
    if isinstance(value, sympy.Basic) and value.has(sympy.zoo, sympy.nan):
        raise ToolError(f"{read_as} is undefined (a division by zero or an indeterminate form)")
    exact = _decimal(value) if isinstance(value, sympy.Float) else f"{value}{suffix}"
    answer = {"input": read_as, "result": exact}
    if isinstance(value, sympy.Basic) and not value.free_symbols and value.is_number:
        decimal = _decimal(value)
        if decimal != str(value) and not all(part.is_Integer for part in value.as_real_imag()):  # not 5 + 5*I
            answer["decimal"] = decimal
    return answer


def _decimal(value) -> str:
    import sympy

    value = sympy.sympify(value)
    if value.is_Integer:
        return str(value)
    if value.is_Rational and set(sympy.factorint(value.q)) <= {2, 5} and value.q < 10 ** 30:
        # a decimal that ends: all of it (123456789.123456789 * 1000 had been 123456789123.457)
        from decimal import Decimal, localcontext

        with localcontext() as context:
            context.prec = 100
            return str(Decimal(value.p) / Decimal(value.q))
    number = value.evalf(15)
    return str(number).rstrip("0").rstrip(".") if "." in str(number) and "e" not in str(number) else str(number)


def _main_symbol(expr):
    symbols = sorted(expr.free_symbols, key=lambda s: (str(s) != "x", str(s)))
    if not symbols:
        raise ToolError(f"{expr} has no variable to differentiate or integrate by")
    return symbols[0]


def _parse(text: str):
    """A SymPy expression from a whitelisted math string; ToolError when it is not one."""
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            rationalize, standard_transformations)

    original = text
    # "7 x 8" is a product, as Wolfram|Alpha reads it (it had become 56*x)
    text = _TIMES_X.sub("*", text)
    for words, symbol in _WORDS:
        text = words.sub(symbol, text)
    for alias, name in _ALIASES.items():
        text = re.sub(rf"(?<![A-Za-z]){re.escape(alias)}(?![A-Za-z])", name, text) if alias.isalpha() \
            else text.replace(alias, name)
    text = text.strip()
    if not text or len(text) > _MAX_QUERY or not _ALLOWED_CHARS.match(text) or "__" in text or "_" in text:
        raise ToolError(f"cannot read {original!r} as math: the offline wolfram_alpha answers arithmetic, "
                        "solve ..., derivative of ..., integrate ... [from a to b], limit of ... as x -> a, "
                        "factor/expand/simplify ... and unit conversions (convert 5 miles to km)")
    for name in _IDENTIFIER.findall(_NUMBER.sub("0", text)):  # 1E10's "E10" is no name
        if name not in _FUNCTIONS and not re.fullmatch(r"[a-zA-Z]\d?", name):
            raise ToolError(f"cannot read {original!r} as math: unknown name {name!r}")
    # rationalize: 0.1 + 0.2 - 0.3 is 0, as written, not a binary float's 5.6e-17
    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor, rationalize)
    try:
        expr = parse_expr(text, transformations=transformations, evaluate=False)
        if isinstance(expr, sympy.Basic):
            _check_size(expr, original)
            expr = parse_expr(text, transformations=transformations)  # checked: now evaluated
    except ToolError:
        raise
    except Exception:  # noqa: BLE001 - SymPy's parser raises anything from SyntaxError to TypeError
        raise ToolError(f"cannot read {original!r} as math") from None
    if not isinstance(expr, sympy.Basic):
        raise ToolError(f"cannot read {original!r} as one expression")
    return expr


def _check_size(expr, original: str) -> None:
    """Refuse powers and factorials whose exact value would take forever to compute."""
    import sympy

    for node in sympy.preorder_traversal(expr):
        big = None
        if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
            big = node.exp
        elif isinstance(node, (sympy.factorial, sympy.binomial)) and not node.args[0].free_symbols:
            big = node.args[0]
        if big is not None and _too_big(big):
            raise ToolError(f"{original!r} is too large to compute exactly")


def _too_big(number) -> bool:
    import sympy

    for node in sympy.preorder_traversal(number):  # an exponent that is itself a power: check it bottom-up
        if isinstance(node, sympy.Pow) and node is not number and _too_big(node):
            return True
    try:
        return abs(complex(sympy.N(number, 5))) > _MAX_EXPONENT
    except (TypeError, ValueError, OverflowError):
        return True


@functools.cache
def _units():
    import pint

    return pint.UnitRegistry()


def _convert_units(text: str) -> dict | None:
    """A unit conversion, or None when `text` does not name two units pint knows."""
    if m := _HOW_MANY.match(text):
        value, src, dst = "1", m["src"], m["dst"]
    elif m := _CONVERT.match(text):
        value, src, dst = m["value"] or "1", m["src"], m["dst"]
    else:
        return None
    import pint

    ureg = _units()
    names = {"fahrenheit": "degF", "celsius": "degC", "centigrade": "degC", "°f": "degF", "°c": "degC"}
    src, dst = (names.get(u.strip().lower(), u.strip()) for u in (src, dst))
    src, dst = (re.sub(r"^(an?|one)\s+", "", u) for u in (src, dst))
    try:
        quantity = ureg.Quantity(float(value), ureg.parse_units(src))
        converted = quantity.to(ureg.parse_units(dst))
    except (pint.errors.UndefinedUnitError, pint.errors.DimensionalityError, AttributeError, ValueError,
            TypeError, AssertionError, tokenize.TokenError) as error:  # TokenError: unbalanced brackets
        if isinstance(error, pint.errors.DimensionalityError):
            raise ToolError(f"cannot convert {src} to {dst}: {error}") from None
        return None
    magnitude = converted.magnitude
    if not quantity._is_multiplicative:
        # offset units (°F, °C) leave float residue where the answer is a round number: 32 °F had been 5.7e-14 °C
        magnitude = round(magnitude, 9) + 0.0
    # 15 digits, what a float holds: 10 had rounded 123456789.012 km to 123456789
    return {"input": f"convert {value} {src} to {dst}", "result": f"{magnitude:.15g} {converted.units:~}",
            "decimal": f"{magnitude:.15g}"}
