"""Code Shield's rules: semgrep rules per language (rules/<language>.yaml) and regex rules (rules/regex.yaml).

Every rule carries a CWE id and a severity: ERROR blocks the code, WARNING warns. A semgrep rule also carries a
prescan regex: semgrep runs only the rules whose prescan matches, and not at all when none does, which is what
keeps clean code fast.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

RULES_DIR = Path(__file__).parent / "rules"
DECISIONS = {"ERROR": "block", "WARNING": "warn"}


@dataclass(frozen=True)
class Rule:
    id: str
    languages: tuple[str, ...]  # herd's language names; ("any",) for regex rules that apply everywhere
    cwe: str
    decision: str  # block or warn
    message: str
    pattern: re.Pattern  # the regex rule itself, or a semgrep rule's prescan
    semgrep: dict | None = None  # the rule as semgrep reads it; None for a regex rule


def _rule(spec: dict, languages: tuple[str, ...], pattern: str, semgrep: dict | None) -> Rule:
    for key in ("id", "severity", "message", "metadata"):
        if key not in spec:
            raise ValueError(f"code shield rule {spec.get('id', '?')}: missing {key}")
    if spec["severity"] not in DECISIONS:
        raise ValueError(f"code shield rule {spec['id']}: severity must be ERROR or WARNING")
    return Rule(spec["id"], languages, spec["metadata"]["cwe"], DECISIONS[spec["severity"]], spec["message"],
                re.compile(pattern, re.MULTILINE), semgrep)


@lru_cache(maxsize=1)
def load_rules() -> tuple[dict[str, tuple[Rule, ...]], tuple[Rule, ...]]:
    """({rule file: its semgrep rules}, the regex rules), read once per process."""
    import yaml

    semgrep: dict[str, tuple[Rule, ...]] = {}
    for path in sorted(RULES_DIR.glob("*.yaml")):
        specs = yaml.safe_load(path.read_text(encoding="utf-8"))["rules"]
        if path.stem == "regex":
            regex = tuple(_rule(s, tuple(s["languages"]), s["regex"], None) for s in specs)
        else:
            semgrep[path.stem] = tuple(_rule(s, (path.stem,), s["metadata"]["prescan"], s) for s in specs)
    return semgrep, regex
