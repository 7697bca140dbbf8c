"""De-duplication in its three phases, run the way the orchestrator runs it: keys per batch, one plan, apply per batch."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest

from herd.data.dedup import ExactDedup, LineDedup, MinHashDedup, URLDedup, normalize_url
from herd.data.document import Document

BATCH = 37  # not a divisor of the corpus size, so batches end mid-way through everything


def batches(docs, size=BATCH):
    return [docs[i : i + size] for i in range(0, len(docs), size)]


def run(stage, docs):
    keyed = [k for batch in batches(docs) for k in stage.keys(batch)]
    plan = stage.plan(iter(keyed))
    kept, dropped = [], []
    for batch in batches(docs):
        result = stage.apply(batch, plan)
        kept += result.kept
        dropped += result.dropped
    assert len(kept) + len(dropped) == len(docs)
    return kept, {x.id: x.reason for x in dropped}


def test_exact_dedup_finds_every_planted_copy_and_nothing_else(planted_corpus):
    _, dropped = run(ExactDedup(), planted_corpus.docs)
    assert dropped == {i: f"exact_duplicate_of:{orig}" for i, orig in planted_corpus.exact_dups.items()}
    _, strict = run(ExactDedup(casefold=False), planted_corpus.docs)
    assert set(strict) < set(dropped)  # the upper-cased copies differ by case only


def test_minhash_finds_near_duplicates_and_keeps_distinct_docs(planted_corpus):
    _, dropped = run(MinHashDedup(), planted_corpus.docs)
    near = planted_corpus.near_dups
    found = sum(dropped.get(i) == f"near_duplicate_of:{orig}" for i, orig in near.items())
    print(f"minhash: {found}/{len(near)} near duplicates found, {len(dropped)} dropped in all")
    assert found / len(near) >= 0.9
    copies = set(near) | set(planted_corpus.exact_dups)
    assert set(dropped) <= copies, set(dropped) - copies  # precision: no real document is lost
    assert sum(i in dropped for i in planted_corpus.exact_dups) >= 9


def test_minhash_signatures_agree_across_processes(planted_corpus):
    stage = MinHashDedup()
    docs = planted_corpus.docs[:60]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        remote = [k for ks in pool.map(stage.keys, batches(docs, 20)) for k in ks]
    assert remote == stage.keys(docs)


def test_minhash_similarity_estimate_is_sane():
    stage = MinHashDedup()
    base = " ".join(f"w{i}" for i in range(400))
    edited = base.replace("w100 ", "x100 ").replace("w300 ", "x300 ")
    other = " ".join(f"v{i}" for i in range(400))
    sig = stage.signature(base)
    assert (sig == stage.signature(edited)).mean() > 0.9
    assert (sig == stage.signature(other)).mean() < 0.1
    assert stage.signature("!!! ...") is None


def test_url_dedup_normalises_and_finds_planted_variants(planted_corpus):
    _, dropped = run(URLDedup(), planted_corpus.docs)
    assert dropped == {i: f"url_duplicate_of:{orig}" for i, orig in planted_corpus.url_dups.items()}


@pytest.mark.parametrize("url, same_as", [
    ("HTTPS://Example.COM:443/a/b/?utm_source=x&q=1#frag", "https://example.com/a/b?q=1"),
    ("http://example.com:80/", "http://example.com"),
    ("https://example.com/p?b=2&a=1&utm_medium=mail", "https://example.com/p?a=1&b=2"),
])
def test_normalize_url(url, same_as):
    assert normalize_url(url) == normalize_url(same_as)


@pytest.mark.parametrize("a, b", [
    ("https://example.com/a", "https://example.com/b"),
    ("https://example.com:8443/a", "https://example.com/a"),
    ("https://example.com/a?id=1", "https://example.com/a?id=2"),
    ("https://example.com/Path", "https://example.com/path"),
])
def test_normalize_url_keeps_distinct_urls_apart(a, b):
    assert normalize_url(a) != normalize_url(b)


def test_line_dedup_removes_boilerplate_and_keeps_rare_lines(planted_corpus):
    docs = planted_corpus.docs
    kept, dropped = run(LineDedup(), docs)
    assert not dropped
    boiler = {b.casefold() for b in planted_corpus.boilerplate}
    assert not [(d.id, s) for d in kept for s in d.text.split("\n") if s.strip().casefold() in boiler]
    twice = [d for d in kept if d.id in planted_corpus.twice_docs]
    assert len(twice) == 2 and all(planted_corpus.twice_line in d.text for d in twice)
    touched = {d.id for d in kept if d.meta.get("lines_removed")}
    assert touched >= planted_corpus.boilerplate_docs
    # GCIDE's "[1913 Webster]" source line is real boilerplate: in every dictionary document, and gone
    gcide = [d for d in kept if d.id.startswith("gcide-")]
    assert gcide and not any(s.strip() == "[1913 Webster]" for d in gcide for s in d.text.split("\n"))
    # everything else removed is a line shared by more than six documents
    before = {d.id: d for d in docs}
    counts: dict[str, int] = {}
    for d in docs:
        for s in {" ".join(s.split()).casefold() for s in d.text.split("\n")}:
            counts[s] = counts.get(s, 0) + 1
    for d in kept:
        removed = set(before[d.id].text.split("\n")) - set(d.text.split("\n"))
        assert all(counts[" ".join(s.split()).casefold()] > 6 for s in removed if s.strip()), d.id


def test_line_dedup_buckets_and_empty_documents():
    line = "Subscribe to our newsletter for weekly updates"
    docs = [Document(f"d{i}", f"{line}\nBody text number {i} of the story.") for i in range(12)]
    docs.append(Document("only-boilerplate", f"{line}\n\n{line}"))
    kept, dropped = run(LineDedup(), docs)
    assert dropped == {"only-boilerplate": "lines:empty_after_dedup"}
    assert all(d.text == f"Body text number {d.id[1:]} of the story." and d.meta["lines_removed"] == 1 for d in kept)
    assert docs[0].text.startswith(line)  # inputs untouched
    # buckets of 6 documents: no bucket holds the line more than six times
    kept, dropped = run(LineDedup(bucket_size=6), docs)
    assert not dropped and all(line in d.text for d in kept)
