"""What each stage kept and dropped, in documents and tokens, overall, per language and per domain.

Workers fill a `Tally` per work unit; the pipeline merges them into `report.json`, which `render` turns
into a table on the terminal and `chart` into a PNG.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT = "report.json"
CHART = "report.png"
UNKNOWN = "-"  # the language or domain of a document dropped before anything assigned one
EXAMPLES_PER_REASON = 2  # dropped documents shown per stage and kind of reason, the first in input order
EXAMPLES_PER_STAGE = 6
SNIPPET_CHARS = 240


def _count() -> dict[str, int]:
    return {"docs": 0, "tokens": 0, "bytes": 0}


def _snippet(text: str) -> str:
    """The text's first SNIPPET_CHARS, its runs of whitespace one space each."""
    words, size = [], 0
    for word in re.finditer(r"\S+", text):
        words.append(word.group())
        size += len(word.group()) + 1
        if size > SNIPPET_CHARS:
            break
    return " ".join(words)[:SNIPPET_CHARS]


def _add(into: dict[str, int], docs: int, tokens: int, nbytes: int) -> None:
    into["docs"] += docs
    into["tokens"] += tokens
    into["bytes"] += nbytes


@dataclass
class Tally:
    """Counts of one work unit (or, merged, of a run); plain dicts so it travels as JSON."""

    read: dict[str, int] = field(default_factory=_count)  # every record the readers produced
    dropped: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(_count))  # by stage
    reasons: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    langs: dict[str, dict[str, dict[str, int]]] = field(
        default_factory=lambda: defaultdict(lambda: {"kept": _count(), "dropped": _count()}))
    domains: dict[str, dict[str, dict[str, int]]] = field(
        default_factory=lambda: defaultdict(lambda: {"kept": _count(), "dropped": _count()}))
    # stage -> a few dropped documents ({id, reason, source, text}), so a user sees what a filter removed
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def add_read(self, nbytes: int) -> None:
        _add(self.read, 1, 0, nbytes)

    def add_dropped(self, stage: str, reason: str, lang: str | None, domain: str | None, tokens: int,
                    nbytes: int, example: dict[str, Any] | None = None) -> None:
        """`example`: the dropped document as {id, source, text} (text None where the reader had none)."""
        _add(self.dropped[stage], 1, tokens, nbytes)
        # "near_duplicate_of:<id>" and the like: the kind, not every instance, is what a report can show
        self.reasons[stage][reason.split(":", 1)[0]] += 1
        _add(self.langs[lang or UNKNOWN]["dropped"], 1, tokens, nbytes)
        _add(self.domains[domain or UNKNOWN]["dropped"], 1, tokens, nbytes)
        if example is not None and self._room_for(stage, reason):
            # A snippet of the text, read from its start only: the whole of every dropped document had been split
            # and joined, however few examples were kept.
            self.examples[stage].append({**example, "reason": reason, "text": _snippet(example.get("text") or "")})

    def _room_for(self, stage: str, reason: str) -> bool:
        have = self.examples[stage]
        kind = reason.split(":", 1)[0]
        same = sum(e["reason"].split(":", 1)[0] == kind for e in have)
        return len(have) < EXAMPLES_PER_STAGE and same < EXAMPLES_PER_REASON

    def add_kept(self, lang: str | None, domain: str | None, tokens: int, nbytes: int) -> None:
        _add(self.langs[lang or UNKNOWN]["kept"], 1, tokens, nbytes)
        _add(self.domains[domain or UNKNOWN]["kept"], 1, tokens, nbytes)

    def merge(self, other: Tally) -> None:
        _add(self.read, *other.read.values())
        for stage, c in other.dropped.items():
            _add(self.dropped[stage], *c.values())
        for stage, reasons in other.reasons.items():
            for reason, n in reasons.items():
                self.reasons[stage][reason] += n
        for mine, theirs in ((self.langs, other.langs), (self.domains, other.domains)):
            for key, sides in theirs.items():
                for side, c in sides.items():
                    _add(mine[key][side], *c.values())
        for stage, examples in other.examples.items():  # merged in unit order: the first ones in input order
            for e in examples:
                if self._room_for(stage, e["reason"]):
                    self.examples[stage].append(e)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({"read": self.read, "dropped": self.dropped, "reasons": self.reasons,
                                      "langs": self.langs, "domains": self.domains, "examples": self.examples}))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        t = cls()
        t.merge(cls(read=d["read"], dropped=d["dropped"], reasons=d["reasons"], langs=d["langs"],
                    domains=d["domains"], examples=d.get("examples", {})))
        return t


def build_report(tally: Tally, stage_names: list[str], kept: dict[str, int], shards: dict[str, int],
                 mix: dict[str, Any] | None) -> dict[str, Any]:
    """Stage rows in pipeline order: what came in, what each dropped, what it passed on.

    Tokens "in" at a stage are the tokens those documents had when they left the pipeline (dropped later
    or kept), so rows add up; a stage that rewrites text (masking, line removal) shows as the next
    stage's smaller input. The input's tokens are counted so too: the readers do not tokenize.
    """
    rows = []
    docs_in = tally.read["docs"]
    tokens_in = input_tokens = kept["tokens"] + sum(c["tokens"] for c in tally.dropped.values())
    for name in stage_names:
        d = tally.dropped.get(name, _count())
        rows.append({"stage": name, "docs_in": docs_in, "docs_dropped": d["docs"], "docs_kept": docs_in - d["docs"],
                     "drop_rate": d["docs"] / docs_in if docs_in else 0.0,
                     "tokens_in": tokens_in, "tokens_dropped": d["tokens"],
                     "tokens_kept": tokens_in - d["tokens"], "reasons": dict(tally.reasons.get(name, {})),
                     "examples": list(tally.examples.get(name, []))})
        docs_in -= d["docs"]
        tokens_in -= d["tokens"]
    counts = tally.to_dict()
    return {"input": {**tally.read, "tokens": input_tokens}, "stages": rows, "kept": kept, "shards": shards,
            "languages": dict(sorted(counts["langs"].items())), "domains": dict(sorted(counts["domains"].items())),
            "mix": mix}


def load_report(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / REPORT
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no {REPORT} in {directory}: not a finished `herd data run` output directory") \
            from None


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render(report: dict[str, Any], console=None) -> None:
    """Print the stage, language, domain and mix tables."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        # a non-UTF-8 locale's stdout cannot show every character of the dropped documents' snippets: "?" for
        # those, not a traceback after the run's work is done
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="replace")
        console = Console()
        if not console.is_terminal:  # a log or a pipe: no terminal to fit, so do not cut names short
            console = Console(width=160)
    t = Table(title="herd data: what each stage kept and dropped")
    for col in ("stage", "docs in", "dropped", "kept", "% dropped", "tokens dropped", "tokens kept", "top reasons"):
        t.add_column(col, justify="left" if col in ("stage", "top reasons") else "right", no_wrap=col == "stage")
    for r in report["stages"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items(), key=lambda kv: -kv[1])[:3])
        t.add_row(r["stage"], f"{r['docs_in']:,}", f"{r['docs_dropped']:,}", f"{r['docs_kept']:,}",
                  _pct(r["docs_dropped"], r["docs_in"]), f"{r['tokens_dropped']:,}", f"{r['tokens_kept']:,}",
                  reasons)
    shards = report["shards"]
    t.add_row("shards", "", "", f"{shards['docs']:,}", "", "", f"{shards['tokens']:,}",
              "copies per the mix" if report.get("mix") else "", style="bold")
    console.print(t)
    examples = Table(title="examples of dropped text (the first of each kind, in input order)")
    for col in ("stage", "drop rate", "reason", "where", "text"):
        # the input place stays whole, so it can be pasted; the text folds to the width left
        examples.add_column(col, justify="right" if col == "drop rate" else "left", overflow="fold",
                            no_wrap=col in ("stage", "where"), max_width=40 if col == "reason" else None)
    for r in report["stages"]:
        for i, e in enumerate(r.get("examples", [])):
            examples.add_row(r["stage"] if i == 0 else "", _pct(r["docs_dropped"], r["docs_in"]) if i == 0 else "",
                             e["reason"], e.get("source") or e["id"], e["text"] or "(no text)",
                             end_section=i == len(r["examples"]) - 1)
    if examples.rows:
        console.print(examples)
    for title, key in (("per language", "languages"), ("per domain", "domains")):
        table = Table(title=title)
        for col in (key[:-1] if key != "languages" else "language", "docs kept", "docs dropped", "tokens kept",
                    "tokens dropped"):
            table.add_column(col, justify="right")
        for k, v in report[key].items():
            table.add_row(k, f"{v['kept']['docs']:,}", f"{v['dropped']['docs']:,}", f"{v['kept']['tokens']:,}",
                          f"{v['dropped']['tokens']:,}")
        console.print(table)
    mix = report.get("mix")
    if mix:
        table = Table(title="data mix (token shares)")
        for col in ("domain", "target", "before", "achieved"):
            table.add_column(col, justify="right")
        before_total = sum(mix["before"].values()) or 1
        for d in sorted(set(mix["targets"]) | set(mix["before"])):
            table.add_row(d, f"{mix['targets'].get(d, 0):.3f}", f"{mix['before'].get(d, 0) / before_total:.3f}",
                          f"{mix['achieved'].get(d, 0):.3f}")
        console.print(table)
        if mix.get("warning"):  # absent from the reports of earlier versions
            console.print(f"warning: {mix['warning']}", style="yellow", markup=False)


def chart(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG: documents kept/dropped per stage, tokens per language, and the mix against its targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mix = report.get("mix")
    panels = 3 if mix else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), constrained_layout=True)
    ax = axes[0]
    stages = [r["stage"] for r in report["stages"]]
    kept = [r["docs_kept"] for r in report["stages"]]
    dropped = [r["docs_dropped"] for r in report["stages"]]
    ax.barh(stages, kept, color="tab:green", label="kept")
    ax.barh(stages, dropped, left=kept, color="tab:red", label="dropped")
    for y, r in enumerate(report["stages"]):  # the drop rate beside each bar
        ax.text(r["docs_in"], y, f" {_pct(r['docs_dropped'], r['docs_in'])}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    ax.set_title("per stage")
    ax.legend()

    ax = axes[1]
    langs = list(report["languages"])
    ax.bar(langs, [report["languages"][k]["kept"]["tokens"] for k in langs], color="tab:green", label="kept")
    ax.bar(langs, [report["languages"][k]["dropped"]["tokens"] for k in langs],
           bottom=[report["languages"][k]["kept"]["tokens"] for k in langs], color="tab:red", label="dropped")
    ax.set_ylabel("tokens")
    ax.set_title("per language")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()

    if mix:
        ax = axes[2]
        domains = sorted(mix["targets"])
        xs = range(len(domains))
        ax.bar([x - 0.2 for x in xs], [mix["targets"][d] for d in domains], width=0.4, label="target")
        ax.bar([x + 0.2 for x in xs], [mix["achieved"].get(d, 0) for d in domains], width=0.4, label="achieved")
        ax.set_xticks(list(xs), domains)
        ax.set_ylabel("share of tokens")
        ax.set_title("data mix")
        ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path
