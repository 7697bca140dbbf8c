"""The shields measured: Code Shield against Meta's codeshield and bandit on the same code (precision, recall,
lines per second, interleaved case by case in this one process), and the latency each shield adds to a request.

Two corpora: herd's insecure / fixed snippet pairs (tests/safety/code_corpus.py, written with herd's rules: a
snippet counts as flagged when a tool reports anything), and Meta's own annotated rule tests that ship inside
codeshield (semgrep's `ruleid:` / `ok:` comments, written with codeshield's rules: each annotated line is a
case, flagged when a tool reports that line). Each corpus favours the rules it was written with; both are shown.

    .venv/bin/python bench/guard.py [--prompt-guard out/prompt-guard.npz] [--guard out/llama-guard-head.npz]
                                    [--per-case 2] [--png docs/code-shield.png]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
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


def codeshield_scan(code: str, language: str) -> set[int] | None:
    from codeshield.cs import CodeShield as MetaCodeShield
    from codeshield.insecure_code_detector.languages import Language

    _codeshield_on_this_semgrep()
    lang = {"python": Language.PYTHON, "c": Language.C, "cpp": Language.CPP, "javascript": Language.JAVASCRIPT,
            "java": Language.JAVA}.get(language)
    if lang is None:
        return None  # codeshield has no rules for this language
    result = asyncio.run(MetaCodeShield.scan_code(code, lang))
    return {issue.line for issue in result.issues_found or []}


def bandit_scan(code: str, language: str) -> set[int] | None:
    if language != "python":
        return None  # bandit reads Python only
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(code)
    try:
        done = subprocess.run([sys.executable, "-m", "bandit", "-q", "-f", "json", fh.name], capture_output=True,
                              text=True)
        return {r["line_number"] for r in json.loads(done.stdout or "{}").get("results", [])}
    finally:
        Path(fh.name).unlink()


def tools() -> dict:
    """Each tool as (code, language) -> the lines it flags, or None for a language it does not read."""
    herd_shield = CodeShield()
    return {"herd": lambda c, lang: {f["line"] for f in herd_shield.scan(c, lang)["findings"]},
            "herd (language detected)": lambda c, lang: {f["line"] for f in herd_shield.scan(c)["findings"]},
            "codeshield": codeshield_scan, "bandit": bandit_scan}


def snippet_cases(per_case: int, seed: int = 0) -> list[tuple[str, str, dict[int | None, bool]]]:
    """herd's corpus: (language, code, {None: insecure?}) for each insecure snippet and its fix."""
    return [(case.language, code, {None: bad}) for case, insecure, fixed in variants(seed, per_case)
            for code, bad in ((insecure, True), (fixed, False))]


def annotated_cases() -> list[tuple[str, str, dict[int | None, bool]]]:
    """Meta's corpus: (language, file text, {line: insecure?}) for each of codeshield's annotated rule tests in
    the languages herd covers; an annotation judges the line after it, as semgrep's test runner reads them."""
    import codeshield

    root = Path(list(codeshield.__path__)[0]) / "insecure_code_detector" / "rules" / "semgrep"
    cases = []
    for language, pattern in (("python", "python/*.py"), ("c", "c/*.c"), ("javascript", "javascript/**/*.js")):
        for path in sorted(root.glob(pattern)):
            text = path.read_text()
            marks = {}
            for i, line in enumerate(text.splitlines(), start=1):
                m = re.search(r"(?:#|//)\s*(ruleid|ok)\s*:", line)
                if m:
                    marks[i + 1] = m.group(1) == "ruleid"
            if marks:
                cases.append((language, text, marks))
    return cases


def code_benchmark(cases, desc: str) -> dict:
    """Precision / recall per tool and language over the cases, every tool on every case in turn."""
    from tqdm import tqdm

    scanners = tools()
    counts = {name: defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0}) for name in scanners}
    seconds, lines = defaultdict(float), defaultdict(int)
    for language, code, marks in tqdm(cases, desc=desc, file=sys.stderr):
        for name, scan in scanners.items():  # interleaved: the same load falls on every tool
            started = time.perf_counter()
            flagged = scan(code, language)
            if flagged is None:
                continue
            seconds[name] += time.perf_counter() - started
            lines[name] += code.count("\n") + 1
            cell = counts[name][language]
            for line, bad in marks.items():
                hit = bool(flagged) if line is None else line in flagged
                cell[("tp" if hit else "fn") if bad else ("fp" if hit else "tn")] += 1
    return {"counts": {n: dict(c) for n, c in counts.items()}, "seconds": dict(seconds), "lines": dict(lines)}


def _pr(cells) -> tuple[float, float, int]:
    tp = sum(c["tp"] for c in cells)
    fp = sum(c["fp"] for c in cells)
    fn = sum(c["fn"] for c in cells)
    return (tp / (tp + fp) if tp + fp else float("nan"), tp / (tp + fn) if tp + fn else float("nan"), tp + fn)


def print_code_table(title: str, result: dict) -> None:
    langs = sorted({lang for c in result["counts"].values() for lang in c})
    print(f"\n{title}\n{'language':12}" + "".join(f"{name + ' P/R':>26}" for name in result["counts"]))
    for lang in langs + ["all"]:
        row = f"{lang:12}"
        for name, per_lang in result["counts"].items():
            cells = list(per_lang.values()) if lang == "all" else [per_lang[lang]] if lang in per_lang else []
            p, r, n = _pr(cells)
            row += f"{'n/a':>26}" if not cells else f"{p:>16.2f} / {r:.2f} ({n:>3})"
        print(row)
    speed = {n: result["lines"][n] / result["seconds"][n] for n in result["seconds"]}
    print("lines/s: " + ", ".join(f"{n} {v:.0f}" for n, v in speed.items())
          + f"  (herd/codeshield: {speed['herd'] / speed['codeshield']:.2f}x; (n): insecure cases)")


def latency(args) -> None:
    """Milliseconds each shield adds to one request (median and p90 over `repeats` requests)."""
    from herd.safety import datasets
    from herd.safety.shields import Shields

    requests = [e.text for e in datasets.python_faq_questions()][:40]
    clean = "Use sorted():\n```python\nnames = sorted(names, key=str.lower)\n```"
    insecure = "```python\nimport pickle\n\ndef load(b):\n    return pickle.loads(b)\n```"
    shield = CodeShield()
    rows = [("code shield, reply with clean code", lambda: list(shield.scan_stream([clean]))),
            ("code shield, reply with insecure code", lambda: list(shield.scan_stream([insecure])))]
    pg = guard = None
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
    shields = Shields(guard, pg, shield)
    it3 = iter(requests * 10)

    def around_one_request():  # what the server does: the request in, then the reply out
        messages = [{"role": "user", "content": next(it3)}]
        shields.check_input(messages)
        shields.reply_filter(messages).feed(clean, final=True)

    rows.append(("all of them, request + clean reply", around_one_request))
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


def code_png(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.3 * len(results)), squeeze=False)
    for row, (title, result) in zip(axes, results.items()):
        langs = sorted({lang for c in result["counts"].values() for lang in c})
        n = len(result["counts"])
        width = 0.8 / n
        for k, (metric, ax) in enumerate(zip(("precision", "recall"), row)):
            for j, (name, per_lang) in enumerate(result["counts"].items()):
                values = [(_pr([per_lang[lang]])[k] * 100 if lang in per_lang else 0) for lang in langs]
                ax.bar([i + (j - (n - 1) / 2) * width for i in range(len(langs))], values, width, label=name)
            ax.set_xticks(range(len(langs)), langs, fontsize=8)
            ax.set_title(f"{metric}: {title}", fontsize=9)
            ax.set_ylim(0, 105)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)  # above the bars, not on them
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-case", type=int, default=2, help="seeded variants of each snippet pair")
    parser.add_argument("--prompt-guard", help="a Prompt Guard classifier, to time it")
    parser.add_argument("--guard", help="a Llama Guard head (.npz) or checkpoint, to time it")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--png", help="write the Code Shield comparison chart here")
    parser.add_argument("--latency-only", action="store_true", help="skip the Code Shield comparison")
    args = parser.parse_args()
    if args.latency_only:
        return latency(args)
    results = {"herd's insecure/fixed snippet pairs": code_benchmark(snippet_cases(args.per_case), "snippets"),
               "codeshield's annotated rule tests (lines)": code_benchmark(annotated_cases(), "annotated files")}
    for title, result in results.items():
        print_code_table(title, result)
    if args.png:
        code_png(results, args.png)
    latency(args)


if __name__ == "__main__":
    main()
