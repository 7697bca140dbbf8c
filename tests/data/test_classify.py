"""Model-based classifiers: judge replies parse, the fast classifier learns labels it is given and survives
saving, and the stages score, drop and label documents."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from herd.data.classify import (DOMAINS, DomainClassifier, HashedLinearClassifier, QualityClassifier,
                                label_texts, parse_domain, parse_quality, train)
from herd.data.document import Document
from herd.data.filters.base import word_list


@pytest.mark.parametrize("reply,score", [("2", 2), ("Score: 3/3", 3), ("I'd say two.", 2), ("0\n\nThe document", 0),
                                         ("  1 ", 1), ("1. 1.0.0", 1), ("0.5", None), ("0.0.0.0.", None), ("10", None), ("no idea", None), ("", None)])
def test_parse_quality(reply, score):
    assert parse_quality(reply) == score


@pytest.mark.parametrize("reply,domain", [("code", "code"), ("**Math reasoning**", "math_reasoning"),
                                          ("General.", "general"), ("multilingual", "multilingual"),
                                          ("code, math_reasoning, general", None), ("banana", None)])
def test_parse_domain(reply, domain):
    assert parse_domain(reply) == domain


STOPWORDS = word_list("stopwords/en.txt")


def heuristic_judge(messages):
    """A deterministic stand-in for the LLM: prose with function words is good, keyword soup is not."""
    text = re.search(r'"""\n(.*)\n"""', messages[-1]["content"], re.S).group(1)
    words = text.lower().split()
    share = sum(w in STOPWORDS for w in words) / max(len(words), 1)
    return "3" if share >= 0.05 else "Score: 0"


def degraded(text: str, rng: random.Random) -> str:
    words = [w for w in text.split() if w.lower() not in STOPWORDS]
    rng.shuffle(words)
    return " ".join(words)


def english(planted_corpus):
    return [d.text for d in planted_corpus.docs
            if d.id.startswith(("py-", "fortune-en", "gcide")) and d.id in planted_corpus.clean]


def test_quality_classifier_learns_the_judges_labels(planted_corpus, tmp_path):
    rng = random.Random(0)
    good = english(planted_corpus)
    texts = good + [degraded(t, rng) for t in good]
    labels = label_texts(texts, heuristic_judge, "quality", progress=False)
    assert set(labels) == {"high", "low"}
    result = train(texts, labels, "quality", seed=0)
    assert result.n_test >= 20 and result.accuracy >= 0.9

    path = result.model.save(tmp_path / "quality.npz")
    loaded = HashedLinearClassifier.load(path)
    assert np.allclose(loaded.predict_proba(texts[:20]), result.model.predict_proba(texts[:20]))
    assert loaded.info["task"] == "quality" and loaded.info["heldout_accuracy"] == result.accuracy

    docs = [Document(f"g{i}", t) for i, t in enumerate(good[:10])] + \
           [Document(f"b{i}", degraded(t, rng)) for i, t in enumerate(good[:10])]
    out = QualityClassifier(str(path), threshold=0.5)(docs)
    kept = {d.id for d in out.kept}
    assert len(kept & {f"g{i}" for i in range(10)}) >= 9 and len(kept & {f"b{i}" for i in range(10)}) <= 1
    assert all(0 <= d.scores["quality"] <= 1 for d in out.kept)
    assert {d.reason for d in out.dropped} <= {"low_quality"}
    assert all("quality" not in d.scores for d in docs)  # inputs are not modified


def known_domains(planted_corpus):
    """Labels from where the text came from: the Python manual is code, fortunes in other languages and the
    French Debian Reference are multilingual, English fortunes and the dictionary are general knowledge."""
    out = []
    for d in planted_corpus.docs:
        if d.id not in planted_corpus.clean:
            continue
        if d.id.startswith("py-"):
            out.append((d.text, "code"))
        elif d.id.startswith(("fortune-de", "fortune-es", "fortune-it", "fr-")):
            out.append((d.text, "multilingual"))
        elif d.id.startswith(("fortune-en", "gcide")):
            out.append((d.text, "general"))
    return out


def test_domain_classifier_from_known_sources(planted_corpus, tmp_path):
    pairs = known_domains(planted_corpus)
    result = train([t for t, _ in pairs], [lab for _, lab in pairs], "domain", seed=1)
    assert set(result.model.classes) == {"code", "general", "multilingual"} <= set(DOMAINS)
    assert result.accuracy >= 0.85
    path = result.model.save(tmp_path / "domain.npz")
    docs = [Document("en", "The quick brown fox jumps over the lazy dog. " * 5, lang="en"),
            Document("de", "Der schnelle braune Fuchs springt über den faulen Hund. " * 5, lang="de"),
            Document("py", "def main():\n    for x in range(10):\n        print(x)\n" * 3, lang="en")]
    out = DomainClassifier(str(path))(docs)
    assert not out.dropped
    assert out.kept[1].meta["domain"] == "multilingual"  # by language, whatever the topic
    assert out.kept[2].meta["domain"] == "code"
    assert sum(v for k, v in out.kept[0].scores.items() if k.startswith("domain_")) == pytest.approx(1, abs=1e-4)


def test_training_needs_two_labels_and_loading_needs_a_classifier(tmp_path):
    with pytest.raises(ValueError, match="two distinct labels"):
        train(["a b c"] * 20, ["high"] * 20, "quality")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a herd classifier"):
        HashedLinearClassifier.load(bad)
    with pytest.raises(FileNotFoundError):
        HashedLinearClassifier.load(tmp_path / "missing.npz")


@pytest.mark.heavy
def test_the_default_model_judges_and_its_replies_parse(planted_corpus):
    import herd

    from herd.data.classify import model_judge

    llm = herd.load()
    texts = [t[:500] for t in english(planted_corpus)[:4]]
    labels = label_texts(texts, model_judge(llm, "quality"), "quality", progress=False)
    assert all(lab in ("high", "low") for lab in labels)  # a likelihood judge always answers
    code = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    assert label_texts([code], model_judge(llm, "domain"), "domain", progress=False) == ["code"]


def test_domain_classifier_drives_the_data_mix_of_a_run(planted_corpus, tmp_path):
    import dataclasses
    import json

    from herd.data import pipeline
    from herd.data.config import ShardConfig, StageSpec, default_config
    from herd.data.executors import LocalExecutor
    from herd.data.shards import TokenShards

    pairs = known_domains(planted_corpus)
    model = train([t for t, _ in pairs], [lab for _, lab in pairs], "domain", seed=1).model.save(tmp_path / "d.npz")
    config = dataclasses.replace(
        default_config(), stages=(StageSpec("language"), StageSpec("domain_classifier", {"path": str(model)})),
        shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"), docs_per_unit=100)
    result = pipeline.run(planted_corpus.files, tmp_path / "out", config, LocalExecutor(1, progress=False))
    mix = result.report["mix"]
    assert set(mix["targets"]) == {"general", "code", "multilingual"}  # no math text here: its share is shared out
    for domain, target in mix["targets"].items():
        assert mix["achieved"][domain] == pytest.approx(target, abs=0.03), (domain, mix)
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert all(r["domain"] in mix["targets"] and r["repeats"] >= 1 for r in kept)
    assert any(r["repeats"] > 1 for r in kept) and any(r["stage"] == "mix" for r in dropped)
    assert len(kept) + len(dropped) == len(planted_corpus.docs)
    shards = TokenShards(tmp_path / "out", verify=True)
    assert len(shards) == sum(r["repeats"] for r in kept)
    by_id = {r["id"]: r for r in kept}
    assert all(len(shards[i]) == len(by_id[shards.doc_id(i)]["text"].encode()) + 2 for i in range(len(shards)))
