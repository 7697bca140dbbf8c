"""Which language a snippet is in: a fenced block's info string when there is one, else a vote of markers."""
from __future__ import annotations

import re

LANGUAGES = ("python", "c", "cpp", "javascript", "java", "shell")
EXTENSIONS = {"python": ".py", "c": ".c", "cpp": ".cpp", "javascript": ".js", "java": ".java", "shell": ".sh"}
SEMGREP_NAMES = {"python": "python", "c": "c", "cpp": "cpp", "javascript": "javascript", "java": "java"}
# the rule file each language is checked with (C++ shares C's rules)
RULE_FILES = {"python": "python", "c": "c", "cpp": "c", "javascript": "javascript", "java": "java"}

_ALIASES = {
    "py": "python", "python3": "python", "py3": "python", "python": "python",
    "c": "c", "h": "c", "cpp": "cpp", "c++": "cpp", "cc": "cpp", "cxx": "cpp", "hpp": "cpp",
    "js": "javascript", "javascript": "javascript", "node": "javascript", "nodejs": "javascript", "jsx": "javascript",
    "mjs": "javascript", "ts": "javascript", "typescript": "javascript",
    "java": "java",
    "sh": "shell", "bash": "shell", "shell": "shell", "zsh": "shell", "console": "shell", "shellscript": "shell",
}

# (language, pattern, weight): each marker found adds its weight; the highest total wins
_MARKERS = [
    ("python", r"^\s*def \w+\(.*\)\s*(->.*)?:\s*$", 3),
    ("python", r"^\s*(import \w+(?![\w.]*;)|from [\w.]+ import )", 2),  # a Java import ends with ";"
    ("python", r"^\s*(if|for|while|with|try|elif|else|except)\b.*:\s*$", 1), ("python", r"\bself\.\w+", 1),
    ("python", r"\bprint\(", 1), ("python", r"^\s*class \w+(\(.*\))?:\s*$", 3), ("python", r"\bNone\b|\bTrue\b", 1),
    ("c", r"^\s*#include\s*[<\"]", 3), ("c", r"\b(int|void|char|size_t)\s+\*?\w+\s*\([^)]*\)\s*\{?\s*$", 2),
    ("c", r"\b(printf|malloc|free|strcpy|sprintf|fgets)\s*\(", 1), ("c", r";\s*$", 1),
    ("cpp", r"\bstd::|#include\s*<(iostream|string|vector|map|memory)>|\bcout\s*<<|\bnamespace\b|template\s*<", 4),
    ("javascript", r"\b(const|let|var)\s+\w+\s*=", 2), ("javascript", r"\bfunction\s*\w*\s*\(", 2),
    ("javascript", r"=>", 1), ("javascript", r"\brequire\(['\"]|console\.log|module\.exports|\bawait\b", 3),
    ("javascript", r"\bdocument\.|\bwindow\.|\.then\(", 2),
    ("java", r"\b(public|private|protected)\s+(static\s+)?(final\s+)?(class|void|[A-Z]\w*(<[^>]*>)?)\b", 3),
    ("java", r"^\s*import java(x)?\.", 4), ("java", r"^\s*import (static )?[\w.]+(\.\*)?;\s*$", 2),
    ("java", r"System\.out\.print|@Override|\bnew [A-Z]\w*\(", 2),
    ("java", r"\bString\[\]|\bString\s+\w+\s*=", 2),
    ("shell", r"^#!\s*/(usr/)?bin/(env\s+)?(ba|z|da)?sh", 10), ("shell", r"^\s*(fi|done|esac|then|do)\s*$", 3),
    ("shell", r"^\s*(echo|export|sudo|apt-get|apt|curl|wget|chmod|chown|mkdir|cd|rm|cp|mv|tar|git|pip)\s", 2),
    # a variable's name starts with a letter: "$5" in prose is money
    ("shell", r"\$\{?[A-Za-z_]\w*\}?|\$\(", 1), ("shell", r"^\s*\w+=\S", 1), ("shell", r"^\s*\$ ", 3),
]
_COMPILED = [(lang, re.compile(p, re.MULTILINE), w) for lang, p, w in _MARKERS]


def normalize(language: str | None) -> str | None:
    """herd's name for a language given by a user or a fence ("py", "c++", "bash"); None if it is none of ours."""
    if not language:
        return None
    return _ALIASES.get(language.strip().lower().split()[0] if language.strip() else "")


def detect(code: str) -> str | None:
    """The likeliest of LANGUAGES for a snippet, or None when nothing marks it as code."""
    scores = dict.fromkeys(LANGUAGES, 0)
    for lang, pattern, weight in _COMPILED:
        scores[lang] += weight * min(len(pattern.findall(code)), 3)
    if scores["cpp"]:
        scores["cpp"] += scores["c"]  # C markers are C++ markers too
    best = max(scores, key=scores.get)
    return best if scores[best] >= 2 else None
