"""brave_search: the Brave API (against a local stand-in speaking its JSON) and BM25 over a local collection."""
import json
import threading
import time

import pytest

from herd.tools import BraveSearch, ToolError, http
from herd.tools.search import load_collection

# The shape of Brave's /res/v1/web/search answer (trimmed), as its API reference documents it.
BRAVE_ANSWER = {
    "type": "search",
    "query": {"original": "llama 3.1 release", "more_results_available": True},
    "web": {"type": "search", "results": [
        {"type": "search_result", "title": "Introducing Llama 3.1", "url": "https://ai.meta.com/blog/meta-llama-3-1/",
         "description": "Llama 3.1 405B, released July 23, 2024, is the first openly available model...",
         "language": "en", "profile": {"name": "Meta AI"}},
        {"type": "search_result", "title": "Llama 3.1 - Wikipedia", "url": "https://en.wikipedia.org/wiki/Llama",
         "description": "Llama is a family of large language models released by Meta AI.", "language": "en"},
        {"type": "search_result", "title": "third", "url": "https://example.org/3", "description": "c"},
    ]},
    "news": {"type": "news", "results": []},
}


def test_brave_api_request_and_answer(stand_in):
    stand_in.routes["/res/v1/web/search"] = (200, BRAVE_ANSWER)
    search = BraveSearch("secret-key", base_url=f"{stand_in.url}/res/v1", count=2)
    assert search.backend == "brave"
    answer = search("llama 3.1 release")
    assert answer == {"query": "llama 3.1 release", "top_k": [
        {"title": "Introducing Llama 3.1", "url": "https://ai.meta.com/blog/meta-llama-3-1/",
         "description": "Llama 3.1 405B, released July 23, 2024, is the first openly available model..."},
        {"title": "Llama 3.1 - Wikipedia", "url": "https://en.wikipedia.org/wiki/Llama",
         "description": "Llama is a family of large language models released by Meta AI."}]}
    [request] = stand_in.requests
    assert request["query"] == {"q": "llama 3.1 release", "count": "2"}
    assert request["headers"]["X-Subscription-Token"] == "secret-key"
    assert request["headers"]["Accept"] == "application/json"


def test_brave_api_errors_are_one_line(stand_in, monkeypatch):
    stand_in.routes["/res/v1/web/search"] = (401, {"type": "ErrorResponse"})
    with pytest.raises(ToolError, match=r"Brave Search answered HTTP 401 .*\(check the API key\)"):
        BraveSearch("bad", base_url=f"{stand_in.url}/res/v1")("q")
    stand_in.routes["/res/v1/web/search"] = (200, b"<html>")
    with pytest.raises(ToolError, match="not JSON"):
        BraveSearch("k", base_url=f"{stand_in.url}/res/v1")("q")
    with pytest.raises(ToolError, match="could not be reached"):
        BraveSearch("k", base_url="http://127.0.0.1:9")("q")
    monkeypatch.setenv("BRAVE_API_KEY", "from-env")
    monkeypatch.setenv("BRAVE_BASE_URL", f"{stand_in.url}/res/v1")
    stand_in.routes["/res/v1/web/search"] = (200, BRAVE_ANSWER)
    assert BraveSearch()("x")["top_k"][0]["title"] == "Introducing Llama 3.1"
    assert stand_in.requests[-1]["headers"]["X-Subscription-Token"] == "from-env"


def test_a_slow_or_huge_answer_is_cut_off(stand_in, monkeypatch):
    # A byte every 0.2 s with a 1 s timeout had waited for the whole answer, the timeout counting per read (and,
    # once the body's reads were timed, for the whole of its headers).
    stand_in.routes["/res/v1/web/search"] = (200, BRAVE_ANSWER, 0.2)
    began = time.monotonic()
    with pytest.raises(ToolError, match=r"Brave Search took longer than 1 s to answer"):
        BraveSearch("k", base_url=f"{stand_in.url}/res/v1", timeout=1.0)("q")
    assert time.monotonic() - began < 3
    # Nor does a body's reading go on behind the caller's back: its thread (and socket) ends within a read's wait.
    # (One still reading headers ends when they do: http.client bounds them at 100 lines.)
    stand_in.routes["/res/v1/web/search"] = (200, BRAVE_ANSWER, 0.05, "body")
    before = set(threading.enumerate())
    for _ in range(3):
        with pytest.raises(ToolError, match=r"took longer than 0.5 s"):
            BraveSearch("k", base_url=f"{stand_in.url}/res/v1", timeout=0.5)("q")
    time.sleep(1.5)
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("herd-http")]
    monkeypatch.setattr(http, "MAX_BODY_BYTES", 1000)
    stand_in.routes["/res/v1/web/search"] = (200, {"web": {"results": [], "pad": "x" * 2000}})
    with pytest.raises(ToolError, match="answered with more than 1,000 bytes"):
        BraveSearch("k", base_url=f"{stand_in.url}/res/v1")("q")


DOCS = [
    {"id": "a", "url": "https://example.org/tea", "text": "Green tea is made from the leaves of Camellia sinensis. "
     "It is steamed or pan-fired to stop oxidation."},
    {"id": "b", "url": "https://example.org/volcano", "text": "Mount Etna is an active stratovolcano on the east "
     "coast of Sicily, one of the most active volcanoes in the world."},
    {"id": "c", "url": "https://example.org/rust", "text": "Rust is a systems programming language focused on "
     "memory safety; its borrow checker rejects data races at compile time."},
]


@pytest.fixture
def kept(tmp_path):
    path = tmp_path / "kept.jsonl"
    path.write_text("".join(json.dumps(d | {"lang": "en", "scores": {}}) + "\n" for d in DOCS))
    return path


def test_bm25_over_kept_documents(kept, monkeypatch):
    monkeypatch.delenv("BRAVE_API_KEY", raising=False)
    search = BraveSearch(collection=kept, count=2)
    assert search.backend == "bm25"
    top = search("which volcano is active in Sicily?")["top_k"]
    assert top[0]["url"] == "https://example.org/volcano"
    assert "Sicily" in top[0]["description"]
    assert [t["url"] for t in search("borrow checker memory safety")["top_k"]][0] == "https://example.org/rust"
    assert search("the of and")["top_k"] == []  # stopwords only: nothing matches


def test_a_snippet_shows_a_searched_word(tmp_path, monkeypatch):
    """A snippet had been centred on the first query word found anywhere as a substring: a stopword ("the") or
    a part of another word ("art" in "particular"), showing none of the words searched for."""
    monkeypatch.delenv("BRAVE_API_KEY", raising=False)
    text = ("The history of the region is long. " + "Filler about nothing in particular. " * 30
            + "Quantization stores weights in four bits.")
    collection = tmp_path / "kept.jsonl"
    collection.write_text(json.dumps({"text": text, "url": "https://example.org/q"}) + "\n"
                          + json.dumps({"text": "another document about cats", "url": "https://example.org/c"}) + "\n")
    for query in ("what is the quantization", "art of quantization"):
        assert "Quantization" in BraveSearch(collection=collection)(query)["top_k"][0]["description"], query


def test_bm25_over_a_directory_and_bad_collections(tmp_path, monkeypatch):
    monkeypatch.delenv("BRAVE_API_KEY", raising=False)
    monkeypatch.delenv("HERD_SEARCH_COLLECTION", raising=False)
    for doc in DOCS:
        (tmp_path / f"{doc['id']}.txt").write_text(doc["text"])
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert [d.title for d in load_collection(tmp_path)] == ["a", "b", "c"]
    assert BraveSearch(collection=tmp_path)("green tea leaves")["top_k"][0]["title"] == "a"
    with pytest.raises(ToolError, match="needs an API key"):
        BraveSearch()
    with pytest.raises(ToolError, match="no search collection at"):
        BraveSearch(collection=tmp_path / "missing")("x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"no_text": 1}\n')
    with pytest.raises(ToolError, match=r"bad.jsonl:2 is not a JSON object with a \"text\" field"):
        BraveSearch(collection=bad)("x")
    marked = tmp_path / "marked.jsonl"  # a byte-order mark (Windows editors write one) opens the file
    marked.write_text("\ufeff" + json.dumps(DOCS[0]) + "\n")
    assert [d.text for d in load_collection(marked)] == [DOCS[0]["text"]]
