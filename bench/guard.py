"""The shields measured: Code Shield against Meta's codeshield and bandit on the same insecure / fixed code
(precision, recall, lines per second, interleaved case by case in this one process), and the latency each
shield adds to a request.

    .venv/bin/python bench/guard.py [--prompt-guard out/prompt-guard.npz] [--guard out/llama-guard-head.npz]
                                    [--per-case 2] [--png docs/code-shield.png]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "safety"))
from code_corpus import variants  # noqa: E402  (the insecure/fixed corpus the tests use)

from herd.safety import CodeShield  # noqa: E402


def _codeshield_on_this_semgrep() -> None:
    """codeshield passes `--project-root /` for its absolute temp paths, with which the semgrep installed here
    scans no file at all (every semgrep rule would silently find nothing); without it, it scans as codeshield
    means it to. Measuring the peer as it was meant to run is the fair comparison."""
    from codeshield.insecure_code_detector import insecure_code_detector as icd

    if getattr(icd, "_herd_patched", False):
        return
    run = icd._run_command

    async def without_project_root(command: list[str]) -> str:
        if "--project-root" in command:
            i = command.index("--project-root")
            command = command[:i] + command[i + 2:]
        return await run(command)

    icd._run_command, icd._herd_patched = without_project_root, True


def codeshield_scan(code: str, language: str):
    from codeshield.cs import CodeShield as MetaCodeShield
    from codeshield.insecure_code_detector.languages import Language

    _codeshield_on_this_semgrep()
    lang = {"python": Language.PYTHON, "c": Language.C, "cpp": Language.CPP, "javascript": Language.JAVASCRIPT,
            "java": Language.JAVA}.get(language)
    if lang is None:
        return None  # codeshield has no rules for this language
    result = asyncio.run(MetaCodeShield.scan_code(code, lang))
    return result.is_insecure


def bandit_scan(code: str, language: str):
    if language != "python":
        return None  # bandit reads Python only
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(code)
    try:
        done = subprocess.run([sys.executable, "-m", "bandit", "-q", "-f", "json", fh.name], capture_output=True,
                              text=True)
        return bool(json.loads(done.stdout or "{}").get("results"))
    finally:
        Path(fh.name).unlink()


def code_benchmark(per_case: int, seed: int = 0) -> dict:
    herd_shield = CodeShield()
    tools = {"herd": lambda c, lang: herd_shield.scan(c, lang)["verdict"] != "allow",
             "herd (language detected)": lambda c, lang: herd_shield.scan(c)["verdict"] != "allow",
             "codeshield": codeshield_scan, "bandit": bandit_scan}
    counts = {name: defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0}) for name in tools}
    seconds, lines = defaultdict(float), defaultdict(int)
    from tqdm import tqdm

    for case, insecure, fixed in tqdm(list(variants(seed, per_case)), desc="insecure/fixed pairs", file=sys.stderr):
        for code, bad in ((insecure, True), (fixed, False)):
            for name, scan in tools.items():  # interleaved: the same load falls on every tool
                started = time.perf_counter()
                flagged = scan(code, case.language)
                if flagged is None:
                    continue
                seconds[name] += time.perf_counter() - started
                lines[name] += code.count("\n") + 1
                cell = counts[name][case.language]
                cell[("tp" if flagged else "fn") if bad else ("fp" if flagged else "tn")] += 1
    return {"counts": {n: dict(c) for n, c in counts.items()}, "seconds": dict(seconds), "lines": dict(lines)}


def _pr(cells) -> tuple[float, float, int]:
    tp = sum(c["tp"] for c in cells)
    fp = sum(c["fp"] for c in cells)
    fn = sum(c["fn"] for c in cells)
    return (tp / (tp + fp) if tp + fp else float("nan"), tp / (tp + fn) if tp + fn else float("nan"), tp + fn)


def print_code_table(result: dict) -> None:
    langs = sorted({lang for c in result["counts"].values() for lang in c})
    print(f"{'language':12}" + "".join(f"{name + ' P/R':>20}" for name in result["counts"]))
    for lang in langs + ["all"]:
        row = f"{lang:12}"
        for name, per_lang in result["counts"].items():
            cells = list(per_lang.values()) if lang == "all" else [per_lang[lang]] if lang in per_lang else []
            p, r, n = _pr(cells)
            row += f"{'n/a':>20}" if not cells else f"{p:>12.2f} / {r:.2f}"
        print(row)
    print("lines/s: " + ", ".join(f"{n} {result['lines'][n] / result['seconds'][n]:.0f}" for n in result["seconds"])
          + f"  (herd/codeshield: {(result['lines']['herd'] / result['seconds']['herd']) / (result['lines']['codeshield'] / result['seconds']['codeshield']):.2f}x)")


def latency(args) -> None:
    from herd.safety import datasets

    requests = [e.text for e in datasets.python_faq_questions()][:40]
    clean = "Use sorted():\n```python\nnames = sorted(names, key=str.lower)\n```"
    insecure = "```python\nimport pickle\n\ndef load(b):\n    return pickle.loads(b)\n```"
    shield = CodeShield()
    rows = [("code shield, reply with clean code", lambda: shield.scan_stream([clean]) and list(shield.scan_stream([clean]))),
            ("code shield, reply with insecure code", lambda: list(shield.scan_stream([insecure])))]
    if args.prompt_guard:
        from herd.safety.prompt_guard import PromptGuard

        pg = PromptGuard(args.prompt_guard)
        it = iter(requests * 10)
        rows.append(("prompt guard, one request", lambda: pg.score(next(it))))
    if args.guard:
        from herd.safety.llama_guard import load_guard

        guard = load_guard(args.guard)
        it2 = iter(requests * 10)
        rows.append(("llama guard (head), one request", lambda: guard.check([{"role": "user", "content": next(it2)}])))
    print(f"\n{'shield':40}{'median ms':>12}{'p90 ms':>10}")
    for name, fn in rows:
        fn()  # warm
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        print(f"{name:40}{statistics.median(times):>12.1f}{times[int(0.9 * (len(times) - 1))]:>10.1f}")


def code_png(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = sorted({lang for c in result["counts"].values() for lang in c})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    n = len(result["counts"])
    width = 0.8 / n
    for k, (metric, ax) in enumerate(zip(("precision", "recall"), axes)):
        for j, (name, per_lang) in enumerate(result["counts"].items()):
            values = [(_pr([per_lang[lang]])[k] * 100 if lang in per_lang else 0) for lang in langs]
            ax.bar([i + (j - (n - 1) / 2) * width for i in range(len(langs))], values, width, label=name)
        ax.set_xticks(range(len(langs)), langs, fontsize=8)
        ax.set_title(f"{metric} (insecure vs fixed snippets)", fontsize=9)
        ax.set_ylim(0, 105)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-case", type=int, default=2, help="seeded variants of each corpus case")
    parser.add_argument("--prompt-guard", help="a Prompt Guard classifier, to time it")
    parser.add_argument("--guard", help="a Llama Guard head (.npz) or checkpoint, to time it")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--png", help="write the Code Shield comparison chart here")
    args = parser.parse_args()
    result = code_benchmark(args.per_case)
    print_code_table(result)
    if args.png:
        code_png(result, args.png)
    latency(args)


if __name__ == "__main__":
    main()
