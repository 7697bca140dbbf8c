"""Scanning a reply while it streams: each fenced code block is scanned the moment its closing fence arrives, so
a server can stop the reply at the first blocked block instead of after the whole of it; code outside fences (a
reply that is code, a tool call's code) is held and scanned at the end, or when a fence opens after it."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

from herd.safety.code_shield.languages import detect, normalize
from herd.safety.code_shield.scanner import verdict_of

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
_MAY_OPEN = re.compile(r"^ {0,3}(`+|~+)?$|^ {0,3}(`{3,}|~{3,})")  # a last line that is or may become a fence
_TAG = "<|python_tag|>"
_CLOSING = {"(": ")", "[": "]", "{": "}"}
_CODE_LINE = 80  # a pending line this long is taken for prose: code lines are seldom longer
# A line that starts as a sentence does ("The book costs", "It returns None") or ends as one: markers in it ("$5",
# "None", "x = 5") are prose's, not code's.
_PROSE = re.compile(r"^\s*[A-Z][a-z]*,? [A-Za-z]+ [A-Za-z]+\b|[.!?,]\s*$")


class StreamScanner:
    """feed(text) -> scans of the blocks that text completed; finish() -> the scan of an unclosed last block
    (or, for a reply with no fences at all that reads as code, of the whole reply) and of the code a tool call
    would run: everything after `<|python_tag|>` (Llama's call of its code interpreter, Python) and the string
    arguments of a reply that is a JSON function call which read as code (or are named "code").

    Each scan is CodeShield.scan's result plus "block" (its index in the reply), "line" (the reply line the code
    starts on) and "code". `unscanned_from()` says where the text not yet cleared begins: a server streams the
    reply up to there and holds the rest (an open block, a last line that may open one, a tool call, and the whole
    of a reply with no fences yet that has a line reading as code or may be a JSON call, scanned at the end or,
    when a fence opens after it, then).
    """

    def __init__(self, shield, language: str | None = None):
        self.shield, self.language = shield, language
        self._pending = ""  # the last, still incomplete line
        self._lines = 0
        self._fence: str | None = None
        self._info, self._code, self._start = "", [], 0
        self._blocks = 0
        self._text = ""
        self._done = 0  # characters of the complete lines read so far
        self._open_at = 0  # where the open block's fence line begins
        self._tag_at: int | None = None  # where a python_tag call begins: all after it is its code
        self._code_like = False  # a complete line before any fence (or the pending one) reads as code

    def feed(self, text: str) -> list[dict]:
        start = len(self._text)
        self._text += text
        if self._tag_at is not None:
            return []
        tag = self._text.find(_TAG, max(0, start - len(_TAG) + 1))
        if tag >= 0:
            self._tag_at = tag
            if tag < start:  # the tag began in an earlier piece: its start is the end of the pending line
                self._pending = self._pending[:tag - start]
            text = self._text[start:tag]
        *complete, self._pending = (self._pending + text).split("\n")
        scans = []
        for line in complete:
            if (scan := self._line(line)) is not None:
                scans.append(scan)
            self._done += len(line) + 1
        return scans

    def unscanned_from(self) -> int:
        """The offset in the text fed so far before which nothing is (or can become) unscanned code."""
        if self._fence is not None:
            return self._open_at
        if self._blocks == 0 and self._whole_held():
            return 0
        # before any fence, a line is judged once it is whole, unless it runs on as prose does: "impo" would
        # otherwise go out before "import pickle" reads as code
        if _MAY_OPEN.match(self._pending) or (self._blocks == 0 and len(self._pending) < _CODE_LINE):
            return self._done
        return self._done + len(self._pending) - _partial_tag(self._pending)

    def _whole_held(self) -> bool:
        """Whether the reply, with no fence so far, is to be scanned whole at its end and so held until then."""
        return self._held_lines() or _reads_as_code(self._pending)

    def _held_lines(self) -> bool:
        return self._code_like or self.language is not None or self._text.lstrip().startswith(("{", "["))

    def finish(self) -> list[dict]:
        scans = []
        if self._pending:
            line, self._pending = self._pending, ""
            if (scan := self._line(line)) is not None:
                scans.append(scan)
        if self._fence is not None:  # the reply ended inside a block: what arrived of it is still code
            scans.append(self._scan(cut=True))
        elif self._blocks == 0:
            whole = self._text[:self._tag_at]
            result = self.shield.scan(whole, self.language) if whole.strip() else None
            if result and result["language"] is not None:
                scans.append({**result, "block": 0, "line": 1, "code": whole})
        if self._tag_at is not None:
            line = self._text.count("\n", 0, self._tag_at) + 1
            scans.append(self._scanned(self._text[self._tag_at + len(_TAG):], "python", line))
        else:
            scans += [self._scanned(code, language, 1) for code, language in _call_code(self._text)]
        return scans

    def _line(self, line: str) -> dict | None:
        self._lines += 1
        m = _FENCE.match(line)
        if self._fence is None:
            held = self._blocks == 0 and self._done and self._held_lines()
            if m:
                self._fence, self._info, self._code, self._start = m.group(1), m.group(2), [], self._lines + 1
                self._open_at = self._done
                if held:  # the fence would release what was held before it: scan it first
                    return self._scanned(self._text[:self._done], self.language, 1)
            elif self._blocks == 0 and _reads_as_code(line):
                self._code_like = True
            return None
        if m and m.group(1)[0] == self._fence[0] and len(m.group(1)) >= len(self._fence) and not m.group(2):
            return self._scan()
        self._code.append(line)
        return None

    def _scan(self, cut: bool = False) -> dict:
        """The open block's scan; `cut`: the reply ended inside it (out of tokens, mid-statement), where a parser
        reads nothing of the code, so it is scanned again up to its last whole statement and the findings joined."""
        code = "\n".join(self._code)
        scan = self._scanned(code, normalize(self._info) or self.language, self._start)
        self._fence = None
        for whole in _whole_statements(code) if cut else ():
            seen = {(f["rule"], f["line"]) for f in scan["findings"]}
            more = [f for f in self.shield.scan(whole, scan["language"])["findings"]
                    if (f["rule"], f["line"]) not in seen]
            scan["findings"] = sorted(scan["findings"] + more, key=lambda f: (f["line"], f["rule"]))
        scan["verdict"] = verdict_of(scan["findings"])
        return scan

    def _scanned(self, code: str, language: str | None, line: int) -> dict:
        result = self.shield.scan(code, language) if code.strip() else {
            "verdict": "allow", "language": language, "findings": []}
        scan = {**result, "block": self._blocks, "line": line, "code": code}
        self._blocks += 1
        return scan


def _whole_statements(code: str) -> list[str]:
    """Code cut short, ended where a parser can read it: the brackets still open closed after it (a class or
    function body, a call across lines), the same without its last line (cut mid-statement), and the code up to
    the last line at which every bracket opened had closed."""
    lines = code.rstrip("\n").split("\n")
    opened, owed = [], []  # owed[i]: the closing brackets lines[:i + 1] leave owing
    for line in lines:
        for c in line:
            if c in _CLOSING:
                opened.append(_CLOSING[c])
            elif opened and c == opened[-1]:
                opened.pop()
        owed.append("".join(reversed(opened)))
    balanced = max((i + 1 for i, rest in enumerate(owed[:-1]) if not rest), default=0)
    cuts = ["\n".join(lines) + "\n" + owed[-1], "\n".join(lines[:-1]) + "\n" + "".join(owed[-2:-1]),
            "\n".join(lines[:balanced])]
    return [cut + "\n" for cut in dict.fromkeys(cuts) if cut.strip()]


def _reads_as_code(line: str) -> bool:
    """Whether a line alone reads as code: its own markers name a language and it reads as no sentence."""
    return not _PROSE.search(line) and detect(line) is not None


def _partial_tag(text: str) -> int:
    """The length of the end of `text` that begins `<|python_tag|>` (the rest of the tag may follow)."""
    return next((n for n in range(min(len(_TAG) - 1, len(text)), 0, -1) if _TAG.startswith(text[-n:])), 0)


def _call_code(text: str) -> list[tuple[str, str]]:
    """(code, language) for each string argument of a reply that is a JSON function call (or a list of them)
    which reads as code or is named "code" (then read as Python, as a code-running tool's usually is)."""
    head = text.strip()
    if not head.startswith(("{", "[")):
        return []
    try:
        value = json.loads(head)
    except ValueError:
        return []
    found = []
    for call in value if isinstance(value, list) else [value]:
        arguments = call.get("parameters", call.get("arguments")) if isinstance(call, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                continue
        for key, v in arguments.items() if isinstance(arguments, dict) else ():
            if isinstance(v, str) and (language := detect(v) or ("python" if key == "code" else None)):
                found.append((v, language))
    return found


def scan_stream(shield, pieces: Iterable[str], language: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(piece, scans completed by it) for each streamed piece, then ("", the scans of what was left open)."""
    scanner = StreamScanner(shield, language)
    for piece in pieces:
        yield piece, scanner.feed(piece)
    yield "", scanner.finish()
