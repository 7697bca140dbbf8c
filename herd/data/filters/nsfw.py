"""Adult-content filter: density of explicit words in the languages the pipeline keeps, and blocklisted
domains (subdomains included).

The term lists (herd/data/resources/nsfw/LANG.txt) hold exact words, `stem*` prefixes (so inflections
count: fuck, fucking, motherfuckers) and `~words` with innocent senses too (penis, cock, culo), which
count half. Words are matched after case folding and accent stripping (Scheiße, scheisse; coño, cono).
Every list applies to every document: adult text mixes languages. Thresholds and their measured
recall and false-positive rates: README, `bench/data.py --curves`.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

from herd.bounds import NON_NEGATIVE, require
from herd.data.document import Document
from herd.data.filters.base import RESOURCES, DocStage, word_list

LANGUAGES = ("en", "de", "fr", "es", "it")
_PARTS = re.compile(r"[^\W\d_]+")  # the letter runs of a word: "l'enculé" -> l, encule
AMBIGUOUS_WEIGHT = 0.5


def fold(word: str) -> str:
    """Case-folded, without accents: the form both the lists and the text are compared in."""
    decomposed = unicodedata.normalize("NFKD", word.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


@dataclass(frozen=True)
class Terms:
    exact: dict[str, float]  # word -> weight
    stems: dict[int, dict[str, float]]  # stem length -> stem -> weight

    def weight(self, part: str) -> float:
        w = self.exact.get(part)
        if w is not None:
            return w
        for n, stems in self.stems.items():
            if len(part) >= n and (w := stems.get(part[:n])) is not None:
                return w
        return 0.0


@lru_cache(maxsize=None)
def terms(languages: tuple[str, ...] = LANGUAGES) -> Terms:
    exact: dict[str, float] = {}
    stems: dict[int, dict[str, float]] = {}
    for lang in languages:
        path = RESOURCES / "nsfw" / f"{lang}.txt"
        if not path.exists():
            raise ValueError(f"no NSFW term list for language {lang!r}; have: {', '.join(LANGUAGES)}")
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            weight = AMBIGUOUS_WEIGHT if entry.startswith("~") else 1.0
            entry = fold(entry.lstrip("~"))
            if entry.endswith("*"):
                stems.setdefault(len(entry) - 1, {})[entry[:-1]] = weight
            else:
                exact[entry] = weight
    return Terms(exact, dict(sorted(stems.items())))


def explicit_weight(text: str, lexicon: Terms) -> tuple[float, int]:
    """Weighted count of explicit words in `text`, and its number of whitespace words."""
    hits = 0.0
    for tok in fold(text).split():  # folded once for the whole text: the slow part per word
        hits += max((lexicon.weight(p) for p in _PARTS.findall(tok)), default=0.0)
    return hits, len(text.split())


@dataclass
class NSFWFilter(DocStage):
    name: str = "nsfw"
    # A rude word or two in a long page is not adult content: drop on density, with a floor on hits.
    max_word_density: float = 0.015
    min_word_hits: float = 3.0
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))
    domains_file: str = "nsfw_domains.txt"

    def __post_init__(self):
        require(self, NON_NEGATIVE, "max_word_density", "min_word_hits")
        if not (RESOURCES / self.domains_file).is_file():
            shipped = sorted(p.name for p in RESOURCES.glob("*.txt"))
            raise ValueError(f"domains_file {self.domains_file!r} is not among herd's shipped lists "
                             f"({', '.join(shipped)})")

    def process(self, doc: Document) -> Document | str:
        if doc.url and blocked_host(doc.url, word_list(self.domains_file)):
            return "nsfw:domain"
        hits, n = explicit_weight(doc.text, terms(tuple(self.languages)))
        if n and hits >= self.min_word_hits and hits / n >= self.max_word_density:
            return "nsfw:word_density"
        return doc


def blocked_host(url: str, domains: frozenset[str]) -> bool:
    host = (urlsplit(url if "//" in url else "//" + url).hostname or "").rstrip(".")
    parts = host.split(".")
    # the host itself and each parent domain: a.b.example.com -> b.example.com -> example.com
    return any(".".join(parts[i:]) in domains for i in range(len(parts) - 1))
