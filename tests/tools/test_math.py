"""wolfram_alpha: the Full Results API (against a local stand-in) and the offline SymPy/pint backend."""
import math

import pytest
import sympy

from herd.tools import ToolError, WolframAlpha

# The shape of the Full Results API's JSON (output=json, format=plaintext), trimmed from its documentation.
WOLFRAM_ANSWER = {"queryresult": {
    "success": True, "error": False, "numpods": 2, "datatypes": "", "timedout": "",
    "pods": [
        {"title": "Input interpretation", "scanner": "Identity", "id": "Input", "position": 100, "error": False,
         "numsubpods": 1, "subpods": [{"title": "", "plaintext": "integral_0^1 x^2 dx"}]},
        {"title": "Definite integral", "scanner": "Integral", "id": "DefiniteIntegral", "position": 200,
         "error": False, "numsubpods": 1, "primary": True,
         "subpods": [{"title": "", "plaintext": "integral_0^1 x^2 dx = 1/3≈0.333333"}]},
        {"title": "Plot", "subpods": [{"title": "", "plaintext": ""}]},
    ]}}


def test_wolfram_api_request_and_answer(stand_in):
    stand_in.routes["/v2/query"] = (200, WOLFRAM_ANSWER)
    wolfram = WolframAlpha("APP-ID", base_url=f"{stand_in.url}/v2")
    assert wolfram.backend == "wolfram"
    assert wolfram("integrate x^2 from 0 to 1") == {"query": "integrate x^2 from 0 to 1", "pods": [
        {"title": "Input interpretation", "text": "integral_0^1 x^2 dx"},
        {"title": "Definite integral", "text": "integral_0^1 x^2 dx = 1/3≈0.333333"}]}
    assert stand_in.requests[0]["query"] == {"input": "integrate x^2 from 0 to 1", "appid": "APP-ID",
                                             "format": "plaintext", "output": "json"}
    stand_in.routes["/v2/query"] = (200, {"queryresult": {"success": False, "error": False,
                                                          "tips": {"text": "Check your spelling"}}})
    with pytest.raises(ToolError, match="did not understand 'blorp': Check your spelling"):
        wolfram("blorp")
    stand_in.routes["/v2/query"] = (403, {})
    with pytest.raises(ToolError, match="HTTP 403"):
        wolfram("x")


@pytest.fixture(scope="module")
def offline():
    return WolframAlpha(timeout=20)


@pytest.mark.parametrize("query, result", [
    ("What is 2^10 + 3*7?", "1045"),
    ("123456789 * 987654321", str(123456789 * 987654321)),
    ("what is 17 times 23", "391"),
    ("15% of 80", "12"),
    ("what is the square root of 144?", "12"),
    ("10!", str(math.factorial(10))),
    ("(2.5 + 3) * 4", "22"),
    ("e^(i pi)", "-1"),
    ("solve x^2 - 4 = 0", "x = -2; x = 2"),
    ("solve x + y = 3, x - y = 1", "x = 2, y = 1"),
    ("solve 2x + 3 = 7 for x", "x = 2"),
    ("factor x^2 - 1", "(x - 1)*(x + 1)"),
    ("integrate x^2 from 0 to 1", "1/3"),
    ("integral of sin(x) dx", "-cos(x) + C"),
    ("limit of sin(x)/x as x -> 0", "1"),
    ("limit (1 + 1/n)^n as n approaches infinity", "E"),
    ("how many feet in a mile", "5280 ft"),
    ("convert 5 miles to km", "8.04672 km"),
    # "x" between numbers is a product, as Wolfram|Alpha reads it (these had been 56*x, 60*x**2 and an error)
    ("what is 7 x 8", "56"), ("3 x 4 x 5", "60"), ("12x12", "144"), ("solve 2x + 3 = 9", "x = 3"),
    # offset units: float residue had made 0 °C "5.684341886e-14 °C"
    ("convert 32 fahrenheit to celsius", "0 °C"), ("convert 100 celsius to fahrenheit", "212 °F"),
    ("convert 1 nm to km", "1e-12 km"),
    # each had been wrong: binary floats (5.55e-17), a percentage of the whole rest, an integer "factored" to
    # itself, 10 digits of a conversion, an exponent of two digits taken for a name, numbers left unsimplified
    ("0.1 + 0.2 - 0.3", "0"), ("20% of 50 + 10", "20"), ("10% of 200 - 5", "15"),
    ("factor 360", "2^3 * 3^2 * 5"), ("factor 97", "97 (a prime)"),
    ("convert 123456789012 meters to km", "123456789.012 km"), ("1e10 + 1", "10000000001"),
    ("(1+2i)*(3-i)", "5 + 5*I"), ("log(8)/log(2)", "3"), ("√16", "4"),
    # an inequality had crashed the worker; an identity and a contradiction had been "nothing to solve for"
    ("solve x^2 < 4", "(-2 < x) and (x < 2)"), ("2 + 3 = 5", "true"), ("solve x + 1 = x", "no solution"),
])
def test_offline_answers(offline, query, result):
    assert offline(query)["result"] == result


def test_offline_decimals_are_exact(offline):
    answer = offline("100.01 - 100")
    assert (answer["result"], answer["decimal"]) == ("1/100", "0.01")  # had been 0.0100000000000051
    assert offline("123456789.123456789 * 1000")["decimal"] == "123456789123.456789"  # had been 15 digits


def test_offline_calculus_matches_sympy(offline):
    x = sympy.Symbol("x")
    derivative = sympy.sympify(offline("derivative of x^2 sin(x)")["result"])
    assert sympy.simplify(derivative - (2 * x * sympy.sin(x) + x**2 * sympy.cos(x))) == 0
    assert float(offline("integrate e^(-x^2) from -infinity to infinity")["decimal"]) == pytest.approx(math.sqrt(math.pi))
    assert float(offline("100 fahrenheit in celsius")["decimal"]) == pytest.approx((100 - 32) * 5 / 9)
    assert float(offline("60 mph to m/s")["decimal"]) == pytest.approx(60 * 1609.344 / 3600)


@pytest.mark.parametrize("query, message", [
    ("who is the president", "unknown name 'who'"),
    ('__import__("os").system("touch /tmp/pwned")', "cannot read"),
    ("x.__class__", "cannot read"),
    ("9^9^9^9", "too large to compute exactly"),
    ("factorial(100000)", "too large to write out"),
    ("7 / 0", "undefined"),
    ("limit of abs(x)/x as x -> 0", "one-sided limits differ"),
    ("limit of sin(x) as x -> infinity", "does not exist (it oscillates between -1 and 1)"),  # had been a value
    ("limit of 1/x as x -> 0", "does not exist (it grows without bound"),
    ("convert 5 kg to meters", "cannot convert kg to meters"),
    ("2 +", "cannot read"),
])
def test_offline_refuses_clearly(offline, query, message):
    with pytest.raises(ToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        offline(query)


def test_offline_finds_roots_without_a_radical_form(offline):
    answer = offline("solve x^5 - x + 1 = 0")
    assert answer["result"].count("CRootOf") == 5 and answer["decimal"].startswith("x ≈ -1.1673039782614")
    assert offline("roots of x^7 - 3x + 1")["decimal"].count("≈") == 7


@pytest.mark.parametrize("query, message", [
    ("solve sin(x) = x", "cannot solve 'sin(x) = x': SymPy has no method for it"),
    ("how many (((m in km", "cannot read"),
])
def test_offline_refuses_what_sympy_and_pint_cannot_do_in_one_line(offline, capfd, query, message):
    with pytest.raises(ToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        offline(query)
    assert "Traceback" not in capfd.readouterr().err


def test_offline_gives_up_on_time():
    with pytest.raises(ToolError, match="no answer to .* within 0.5 s"):
        WolframAlpha(timeout=0.5)("integrate exp(x^3) sin(x^5) from 0 to 1")
