"""Scanning a reply while it streams: each fenced code block is scanned the moment its closing fence arrives, so
a server can stop the reply at the first blocked block instead of after the whole of it."""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
_MAY_OPEN = re.compile(r"^ {0,3}(`+|~+)?$|^ {0,3}(`{3,}|~{3,})")  # a last line that is or may become a fence


class StreamScanner:
    """feed(text) -> scans of the blocks that text completed; finish() -> the scan of an unclosed last block
    (or, for a reply with no fences at all that reads as code, of the whole reply).

    Each scan is CodeShield.scan's result plus "block" (its index in the reply), "line" (the reply line the code
    starts on) and "code". `unscanned_from()` says where the text not yet cleared begins: a server streams the
    reply up to there and holds the rest (an open block, or a last line that may open one).
    """

    def __init__(self, shield, language: str | None = None):
        self.shield, self.language = shield, language
        self._pending = ""  # the last, still incomplete line
        self._lines = 0
        self._fence: str | None = None
        self._info, self._code, self._start = "", [], 0
        self._blocks = 0
        self._text: list[str] = []
        self._done = 0  # characters of the complete lines read so far
        self._open_at = 0  # where the open block's fence line begins

    def feed(self, text: str) -> list[dict]:
        self._text.append(text)
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
        return self._done if _MAY_OPEN.match(self._pending) else self._done + len(self._pending)

    def finish(self) -> list[dict]:
        scans = []
        if self._pending:
            line, self._pending = self._pending, ""
            if (scan := self._line(line)) is not None:
                scans.append(scan)
        if self._fence is not None:  # the reply ended inside a block: what arrived of it is still code
            scans.append(self._scan())
        elif self._blocks == 0:
            whole = "".join(self._text)
            result = self.shield.scan(whole, self.language) if whole.strip() else None
            if result and result["language"] is not None:
                scans.append({**result, "block": 0, "line": 1, "code": whole})
        return scans

    def _line(self, line: str) -> dict | None:
        self._lines += 1
        m = _FENCE.match(line)
        if self._fence is None:
            if m:
                self._fence, self._info, self._code, self._start = m.group(1), m.group(2), [], self._lines + 1
                self._open_at = self._done
            return None
        if m and m.group(1)[0] == self._fence[0] and len(m.group(1)) >= len(self._fence) and not m.group(2):
            return self._scan()
        self._code.append(line)
        return None

    def _scan(self) -> dict:
        from herd.safety.code_shield.languages import normalize

        code = "\n".join(self._code)
        language = normalize(self._info) or self.language
        result = self.shield.scan(code, language) if code.strip() else {
            "verdict": "allow", "language": language, "findings": []}
        scan = {**result, "block": self._blocks, "line": self._start, "code": code}
        self._blocks += 1
        self._fence = None
        return scan


def scan_stream(shield, pieces: Iterable[str], language: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(piece, scans completed by it) for each streamed piece, then ("", the scans of what was left open)."""
    scanner = StreamScanner(shield, language)
    for piece in pieces:
        yield piece, scanner.feed(piece)
    yield "", scanner.finish()
