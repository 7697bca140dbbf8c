"""brave_search: the Brave Search API when a key is configured, else BM25 over a local collection.

The local collection is the kept documents of `herd data run` (DIR/kept.jsonl or any JSONL with a "text" field)
or a directory of text files; bm25s indexes it once per process. Either backend answers in the shape Llama Stack
gives the model: {"query", "top_k": [{"title", "url", "description"}]}.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from herd.rows import DataError, read_jsonl
from herd.tools.http import ToolError, get_json

BRAVE_URL = "https://api.search.brave.com/res/v1"
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".html", ".htm"}
_SNIPPET_CHARS = 400


@dataclass(frozen=True)
class Document:
    title: str
    url: str
    text: str


class BraveSearch:
    """`BraveSearch()(query)`: the real API with `api_key` (or $BRAVE_API_KEY), else the local `collection`."""

    name = "brave_search"

    def __init__(self, api_key: str | None = None, *, collection: str | Path | None = None,
                 base_url: str | None = None, count: int = 5, timeout: float = 10.0):
        self.api_key = api_key or os.environ.get("BRAVE_API_KEY")
        self.collection = collection or os.environ.get("HERD_SEARCH_COLLECTION")
        self.base_url = (base_url or os.environ.get("BRAVE_BASE_URL") or BRAVE_URL).rstrip("/")
        self.count, self.timeout = count, timeout
        if not self.api_key and not self.collection:
            raise ToolError("brave_search needs an API key (BRAVE_API_KEY) or a local collection to search "
                            "(HERD_SEARCH_COLLECTION: a kept.jsonl of `herd data run`, or a directory of texts)")

    @property
    def backend(self) -> str:
        return "brave" if self.api_key else "bm25"

    def __call__(self, query: str) -> dict:
        query = query.strip()
        if not query:
            raise ToolError("brave_search needs a non-empty query")
        hits = self._api(query) if self.api_key else _index(str(self.collection)).search(query, self.count)
        return {"query": query, "top_k": hits}

    def _api(self, query: str) -> list[dict]:
        body = get_json(f"{self.base_url}/web/search", {"q": query, "count": self.count},
                        headers={"X-Subscription-Token": self.api_key}, timeout=self.timeout, service="Brave Search")
        results = (body.get("web") or {}).get("results") or []
        return [{"title": r.get("title", ""), "url": r.get("url", ""), "description": r.get("description", "")}
                for r in results[: self.count]]


class LocalIndex:
    """BM25 (bm25s, English stopwords) over documents; search returns the best `k` with a snippet each."""

    def __init__(self, documents: list[Document]):
        import bm25s

        if not documents:
            raise ToolError("the search collection holds no documents")
        self.documents = documents
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize([f"{d.title}\n{d.text}" for d in documents], stopwords="en",
                                            show_progress=False), show_progress=False)

    def search(self, query: str, k: int) -> list[dict]:
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.ids[0]:  # only stopwords or unknown words
            return []
        ids, scores = self.retriever.retrieve(tokens, k=min(k, len(self.documents)), show_progress=False)
        return [_hit(self.documents[int(i)], query) for i, s in zip(ids[0], scores[0]) if s > 0]


def _hit(doc: Document, query: str) -> dict:
    return {"title": doc.title, "url": doc.url, "description": _snippet(doc.text, query)}


def _snippet(text: str, query: str) -> str:
    """The part of `text` around the first query word it contains: a whole word that the index searched by (not a
    stopword; "the" and the "art" in "particular" had centred snippets that held no searched word)."""
    from bm25s.stopwords import STOPWORDS_EN

    words = {w for w in re.findall(r"\w+", query.lower()) if w not in STOPWORDS_EN}
    positions = [m.start() for m in re.finditer(r"\w+", text.lower()) if m.group() in words][:1]
    start = max(0, min(positions) - _SNIPPET_CHARS // 4) if positions else 0
    snippet = " ".join(text[start:start + _SNIPPET_CHARS].split())
    return ("..." if start else "") + snippet + ("..." if start + _SNIPPET_CHARS < len(text) else "")


@functools.cache
def _index(collection: str) -> LocalIndex:
    return LocalIndex(load_collection(Path(collection)))


def load_collection(path: Path) -> list[Document]:
    """Documents from a JSONL file (a "text" field; "url", "title" or "id" name it) or a directory of texts."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        return [Document(p.stem, p.as_uri(), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    if not path.is_file():
        raise ToolError(f"no search collection at {path}: give a kept.jsonl, a JSONL file or a directory of texts")
    if path.suffix != ".jsonl":
        return [Document(path.stem, path.as_uri(), path.read_text(encoding="utf-8", errors="replace"))]
    documents = []
    try:
        for where, record in read_jsonl(path):
            text = record.get("text")
            if not isinstance(text, str):
                raise ToolError(f"{where} is not a JSON object with a \"text\" field")
            url = record.get("url") or f"{path.as_uri()}#{record.get('id', where.rsplit(':', 1)[1])}"
            title = record.get("title") or text.strip().split("\n", 1)[0][:80]
            documents.append(Document(title, url, text))
    except DataError as error:
        raise ToolError(str(error)) from None
    return documents
