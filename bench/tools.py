"""The code interpreter's cost: run_python (bubblewrap sandbox) vs a plain, unsandboxed subprocess of the same Python.

Each case runs the same code both ways, interleaved (sandbox, plain, sandbox, ...) so that load from other work on
the machine falls on both alike; the median wall-clock latency per call and their ratio are printed.

    .venv/bin/python bench/tools.py --repeats 10 [--png docs/tools-latency.png]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from herd.tools import run_python, sandbox_problem

CASES = {
    "start-up (pass)": "pass",
    "compute (sum 1e6)": "print(sum(range(10**6)))",
    "import numpy": "import numpy; print(numpy.arange(10).sum())",
    "matplotlib PNG": ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                       "plt.plot([1, 2, 3])\nplt.savefig('p.png')"),
}


# Both sides keep matplotlib's font list between calls (the sandbox shows its own, built once, read-only).
_MPL_CONFIG = tempfile.mkdtemp(prefix="bench-tools-mpl-")


def plain(code: str) -> float:
    """The reference: the same interpreter in a subprocess, no sandbox, in a fresh temporary directory."""
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-B", "-c", code], cwd=work, check=True, capture_output=True,
                       env={**os.environ, "MPLCONFIGDIR": _MPL_CONFIG})
        return time.perf_counter() - started


def sandboxed(code: str) -> float:
    started = time.perf_counter()
    result = run_python(code, timeout=60)
    elapsed = time.perf_counter() - started
    if result["error"]:
        raise SystemExit(f"bench/tools.py: the sandboxed run failed: {result['error']}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--png", help="also draw the latencies here")
    args = parser.parse_args()
    if problem := sandbox_problem():
        raise SystemExit(f"bench/tools.py: no sandbox here: {problem}")
    rows = []
    print(f"{'case':<20} {'sandbox ms':>11} {'plain ms':>9} {'ratio':>6}   (median of {args.repeats}, interleaved)")
    for name, code in CASES.items():
        sandboxed(code), plain(code)  # warm the page cache for both
        times = {"sandbox": [], "plain": []}
        for _ in range(args.repeats):
            times["sandbox"].append(sandboxed(code))
            times["plain"].append(plain(code))
        box, ref = (statistics.median(times[k]) * 1000 for k in ("sandbox", "plain"))
        rows.append((name, box, ref))
        print(f"{name:<20} {box:>11.0f} {ref:>9.0f} {box / ref:>5.2f}x", flush=True)
    if args.png:
        draw(rows, args.png)


def draw(rows: list[tuple[str, float, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    positions = range(len(rows))
    ax.barh([p + 0.2 for p in positions], [r[1] for r in rows], height=0.4, label="run_python (bubblewrap)")
    ax.barh([p - 0.2 for p in positions], [r[2] for r in rows], height=0.4, label="plain subprocess")
    ax.set_yticks(list(positions), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("latency per call, ms (median)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
