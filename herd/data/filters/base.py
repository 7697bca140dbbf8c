"""What every per-document stage shares: the batch loop, copy-on-write documents, text helpers."""
from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from herd.data.document import Document, Dropped, StageResult

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
# Marks that end a sentence. The Latin ones only do before a space or the end (3.14, e.g.); the others wherever
# they stand, since Chinese and Japanese put no space after 。 and nothing else uses these inside a word:
# fullwidth and halfwidth CJK, Devanagari danda (Hindi, Marathi, Nepali, also Bengali), Arabic and Urdu,
# Ethiopic, Armenian, Myanmar, Khmer, Syriac.
SPACED_SENTENCE_ENDS = ".!?…‼⁇⁈⁉"
SENTENCE_ENDS = "。！？．｡।॥؟۔።፧։။។៕܂"
CLOSING_QUOTES = "\"'”’»」』"
# What a line ends in to count as prose for C4's and FineWeb's line rules: a sentence's end, or a closing quote after
# one, as C4 (. ! ? ") and datatrove's FineWeb (Unicode's sentence terminals) read it; a colon, a semicolon or an
# ellipsis ends no sentence (C4 drops lines ending "..." by name).
TERMINAL_PUNCT = tuple(SPACED_SENTENCE_ENDS.replace("…", "") + SENTENCE_ENDS + CLOSING_QUOTES)


class DocStage:
    """A per-document stage. Subclasses are dataclasses with a `name` field and implement `process`.

    `process` returns the document to keep (the same object, or a changed copy) or the drop reason.
    Inputs are never mutated, so a batch can be re-run or shared between stages safely.
    """

    name: str

    def process(self, doc: Document) -> Document | str:
        raise NotImplementedError

    def __call__(self, docs: list[Document]) -> StageResult:
        kept, dropped = [], []
        for doc in docs:
            out = self.process(doc)
            if isinstance(out, str):
                dropped.append(Dropped(doc.id, self.name, out, doc.url))
            else:
                kept.append(out)
        return StageResult(kept, dropped)


def evolve(doc: Document, **changes) -> Document:
    """A copy of `doc` with `changes`; its meta and scores dicts are copied so the original stays intact."""
    changes.setdefault("meta", dict(doc.meta))
    changes.setdefault("scores", dict(doc.scores))
    return replace(doc, **changes)


@lru_cache(maxsize=None)
def word_list(relpath: str) -> frozenset[str]:
    """A shipped list from herd/data/resources: one entry a line, `#` starts a comment."""
    lines = (RESOURCES / relpath).read_text(encoding="utf-8").splitlines()
    return frozenset(s.strip().lower() for s in lines if s.strip() and not s.lstrip().startswith("#"))


# Scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, kana and Han.
UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff" \
            "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
_UNSPACED_CHAR = re.compile(f"[{UNSPACED}]")
# one letter of those scripts with the punctuation and marks around it, or a run of anything else but space
_WORD = re.compile(rf"[^\w\s]*[{UNSPACED}][^\w\s]*|(?:(?![{UNSPACED}])\S)+")


def words(text: str) -> list[str]:
    """Whitespace tokens, language-agnostic and cheap, which is what the Gopher ratios were tuned on; except that
    in scripts written without spaces each letter is a word, since there a whole page is one whitespace token
    (every word-based rule would drop or wave through every Chinese, Japanese or Thai document)."""
    if not has_unspaced(text):
        return text.split()
    return _WORD.findall(text)


def has_unspaced(text: str) -> bool:
    """Whether `text` holds a letter of a script written without spaces (a word of `words` that does is one)."""
    return not text.isascii() and _UNSPACED_CHAR.search(text) is not None


_PUNCT_EDGES = re.compile(r"^\W+|\W+$")


def bare(word: str) -> str:
    """A token without surrounding punctuation, e.g. for word lengths and list look-ups."""
    return _PUNCT_EDGES.sub("", word)


def nonempty_lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.split("\n")) if s]


def duplicated(elements: list[str]) -> tuple[int, int]:
    """How many elements repeat an earlier one, and how many characters those repeats hold."""
    seen: set[str] = set()
    count = chars = 0
    for e in elements:
        if e in seen:
            count += 1
            chars += len(e)
        else:
            seen.add(e)
    return count, chars
