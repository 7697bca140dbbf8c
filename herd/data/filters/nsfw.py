"""Adult-content filter: density of explicit words, and blocklisted domains (subdomains included).

Both lists ship in herd/data/resources, so the filter works offline.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from herd.data.document import Document
from herd.data.filters.base import DocStage, bare, word_list, words


@dataclass
class NSFWFilter(DocStage):
    name: str = "nsfw"
    # A single rude word in a long page is not adult content: drop on density, with a floor on hits.
    max_word_density: float = 0.02
    min_word_hits: int = 2
    words_file: str = "nsfw_words.txt"
    domains_file: str = "nsfw_domains.txt"

    def process(self, doc: Document) -> Document | str:
        if doc.url and blocked_host(doc.url, word_list(self.domains_file)):
            return "nsfw:domain"
        toks = words(doc.text)
        if not toks:
            return doc
        bad = word_list(self.words_file)
        hits = sum(bare(w).lower() in bad for w in toks)
        if hits >= self.min_word_hits and hits / len(toks) >= self.max_word_density:
            return "nsfw:word_density"
        return doc


def blocked_host(url: str, domains: frozenset[str]) -> bool:
    host = (urlsplit(url if "//" in url else "//" + url).hostname or "").rstrip(".")
    parts = host.split(".")
    # the host itself and each parent domain: a.b.example.com -> b.example.com -> example.com
    return any(".".join(parts[i:]) in domains for i in range(len(parts) - 1))
