"""Model-based classifiers: judge replies parse, the fast classifier learns labels it is given and survives
saving, and the stages score, drop and label documents."""
from __future__ import annotations

import json
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


@pytest.mark.parametrize("seed", [0, 69])
def test_the_held_out_split_leaves_every_label_something_to_train_on(seed):
    """Eight texts of one label, two of another: a split of the whole had held out both of the two (seed 69), and
    training then refused one label."""
    texts = [f"ordinary text number {i}" for i in range(8)] + ["rare text one", "rare text two"]
    result = train(texts, ["low"] * 8 + ["high"] * 2, "quality", seed=seed)
    assert sorted(result.model.classes) == ["high", "low"] and (result.n_train, result.n_test) == (9, 1)


def test_training_needs_two_labels_and_loading_needs_a_classifier(tmp_path):
    with pytest.raises(ValueError, match="two distinct labels"):
        train(["a b c"] * 20, ["high"] * 20, "quality")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a herd classifier"):
        HashedLinearClassifier.load(bad)
    with pytest.raises(FileNotFoundError):
        HashedLinearClassifier.load(tmp_path / "missing.npz")
    # a real classifier cut in half, and a text file: each had been numpy's words alone, naming no file, or its
    # advice to unpickle the file
    good = tmp_path / "good.npz"
    train(["good text here"] * 10 + ["bad spam spam"] * 10, ["high"] * 10 + ["low"] * 10, "quality").model.save(good)
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    (tmp_path / "text.npz").write_text("id,text\n1,hello\n")
    for name, reason in (("cut.npz", "not a whole .npz archive"), ("text.npz", "not an .npz archive")):
        with pytest.raises(ValueError) as refused:
            HashedLinearClassifier.load(tmp_path / name)
        assert str(refused.value).startswith(f"{tmp_path / name}: not a herd classifier ({reason}")
        assert "pickle" not in str(refused.value)


def test_a_classifier_that_would_expand_a_thousandfold_is_refused_before_it_does(tmp_path):
    """A zip of zeros had expanded 1000-fold in memory (1.5 MB to 1.5 GiB); the archive's own sizes say so first.
    One of herd's own with many hashed features, mostly zeros, still loads."""
    import zipfile

    import numpy as np

    from herd.data.classify import write_npz

    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("header.npy", "w") as member:
            np.save(member, np.array('{"format": "herd-classifier/1"}'))
        with archive.open("coef.npy", "w", force_zip64=True) as member:  # 1.2 GB of zeros, written 64 MB at a time
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (1, 300_000_000)})
            zeros = bytes(64 << 20)
            for _ in range(300_000_000 * 4 // len(zeros)):
                member.write(zeros)
            member.write(bytes(300_000_000 * 4 % len(zeros)))
    assert bomb.stat().st_size < 8 << 20
    with pytest.raises(ValueError) as refused:
        HashedLinearClassifier.load(bomb)
    assert re.fullmatch(rf"{re.escape(str(bomb))}: not a herd classifier \(its arrays would expand from [\d,]+ "
                        r"bytes to 1,200,000,\d+\); write it again", str(refused.value))
    sparse = HashedLinearClassifier.fit(["a b c"] * 10 + ["x y z"] * 10, ["high"] * 10 + ["low"] * 10,
                                        n_features=1 << 22)
    sparse.save(tmp_path / "sparse.npz")
    assert HashedLinearClassifier.load(tmp_path / "sparse.npz").coef.shape[-1] == 1 << 22


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


def small_domain_model(path, math="math_reasoning"):
    texts = {math: ["Solve 2x + 3 = 7. 2x = 4, x = 2.", "det(A) = 1*4 - 2*3 = -2",
                    "x = 8/4 = 2. Check: 4(2) + 17 = 25."],
             "code": ['def f(x):\n    return x + 1', '{"id": 17, "tags": ["a", "b"]}', "for i in range(3): print(i)"],
             "general": ["The weather was mild all week.", "She walked to the market.", "A short story of a town."]}
    pairs = [(t, label) for label, ts in texts.items() for t in ts] * 10
    return HashedLinearClassifier.fit([t for t, _ in pairs], [lab for _, lab in pairs]).save(path)


def test_only_a_confident_other_language_makes_a_document_multilingual(tmp_path):
    """Any guess but "en" had made a document multilingual: worked math guessed zxx ("no linguistic content") at
    0.03, code guessed la at 0.14."""
    from herd.data.filters.language import LanguageFilter

    path = small_domain_model(tmp_path / "domain.npz")
    guessed = LanguageFilter()([Document("math", "Solve 4x + 17 = 25.\n4x = 25 - 17 = 8\nx = 8/4 = 2"),
                                Document("json", '{"id": 17, "tags": ["a", "b"], "price": 9.99}'),
                                Document("de", "Der schnelle braune Fuchs springt über den faulen Hund. " * 3)]).kept
    assert [d.lang for d in guessed][2] == "de" and all(d.scores["lang"] < 0.65 for d in guessed[:2])
    given = [Document("weak", "Solve 2x = 4, x = 2.", lang="fr", scores={"lang": 0.5}),
             Document("none", "def g(x):\n    return x", lang="zxx", scores={"lang": 0.99}),
             Document("und", "x = 8/4 = 2", lang="und", scores={"lang": 0.9}),
             Document("by-hand", "She walked to the market.", lang="it")]
    domains = {d.id: d.meta["domain"] for d in DomainClassifier(str(path))(guessed + given).kept}
    assert domains == {"math": "math_reasoning", "json": "code", "de": "multilingual", "weak": "math_reasoning",
                       "none": "code", "und": "math_reasoning", "by-hand": "multilingual"}
    german = Document("de", "Der Hund schläft.", lang="de", scores={"lang": 0.8})
    assert DomainClassifier(str(path), min_lang_score=0.9)([german]).kept[0].meta["domain"] != "multilingual"


def test_a_classifier_rewritten_at_its_path_is_read_again(tmp_path):
    """The model had been cached by path alone: a file retrained in place went on scoring with the old weights."""
    texts = ["good words here", "bad spam spam", "good text nice", "spam spam buy now"] * 5
    path = tmp_path / "quality.npz"
    doc = [Document("x", "good words nice")]
    HashedLinearClassifier.fit(texts, ["high", "low", "high", "low"] * 5).save(path)
    assert QualityClassifier(str(path))(doc).kept[0].scores["quality"] > 0.9
    HashedLinearClassifier.fit(texts, ["low", "high", "low", "high"] * 5).save(path)
    assert [d.reason for d in QualityClassifier(str(path))(doc).dropped] == ["low_quality"]


def test_a_mix_target_no_domain_is_labelled_with_is_refused_before_the_run(tmp_path):
    """`math` for `math_reasoning` had run: its share went to the others and every math document was dropped."""
    from herd.data import pipeline
    from herd.data.config import ConfigError, config_from_dict

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "1", "text": "Solve 2x + 3 = 7. 2x = 4, x = 2."}\n')
    path = str(small_domain_model(tmp_path / "domain.npz"))
    config = config_from_dict({"mix": {"targets": {"general": 0.5, "math": 0.25, "code": 0.25}},
                               "shards": {"tokenizer": "herd.data.shards:ByteTokenizer"},
                               "stages": [{"type": "domain_classifier", "path": path}]})
    with pytest.raises(ConfigError, match=re.escape("mix targets name 'math', which the domain classifier never "
                                                    "gives; its domains: code, general, math_reasoning, "
                                                    "multilingual")):
        pipeline.run([src], tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    english_only = config_from_dict({"mix": {"targets": {"general": 0.5, "multilingual": 0.5}},
                                     "stages": [{"type": "domain_classifier", "path": path,
                                                 "non_english_is_multilingual": False}]})
    with pytest.raises(ConfigError, match="name 'multilingual'.*its domains: code, general, math_reasoning$"):
        pipeline.run([src], tmp_path / "out", english_only)


def test_a_domain_the_mix_has_no_target_for_is_refused_before_the_run(tmp_path):
    """A classifier trained with "math" for "math_reasoning" had run under the default mix: every document it called
    math was dropped as downsampled, without a word."""
    import dataclasses

    from herd.data import pipeline
    from herd.data.config import ConfigError, MixConfig, StageSpec, check_mix_domains, default_config

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "1", "text": "Solve 2x + 3 = 7. 2x = 4, x = 2."}\n')
    path = small_domain_model(tmp_path / "domain.npz", math="math")
    config = default_config(domain_model=path)
    with pytest.raises(ConfigError, match=re.escape(
            "the domain classifier labels documents 'math', which the mix has no target for, so it would drop them "
            "all; the mix's domains: general, math_reasoning, code, multilingual; retrain the classifier with these "
            "names, or give a [mix] table with a target for 'math' (0 to drop its documents)")):
        pipeline.run([src], tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    targeted = MixConfig(targets={"general": 0.5, "math": 0.25, "code": 0.17, "multilingual": 0.08})
    check_mix_domains(targeted, {"general", "math", "code", "multilingual"})  # named in [mix]: a domain as any other
    english_only = dataclasses.replace(config, stages=(StageSpec("domain_classifier", {
        "path": str(path), "non_english_is_multilingual": False}),), mix=MixConfig(targets={"general": 0.6,
                                                                                           "math": 0.4}))
    with pytest.raises(ConfigError, match=r"labels documents 'code', which .*give a \[mix\] table with a target for "
                                          r"'code' \(0 to drop"):
        pipeline.run([src], tmp_path / "out", english_only)
    # "multilingual" is the stage's label for non-English text, not the model's: the way out says so.
    no_multilingual = MixConfig(targets={"general": 0.5, "math": 0.25, "code": 0.25})
    with pytest.raises(ConfigError, match=r"labels documents 'multilingual', .*set non_english_is_multilingual = "
                                          r"false in the domain_classifier stage, or give a \[mix\] table"):
        check_mix_domains(no_multilingual, {"general", "math", "code", "multilingual"})


def test_train_classifier_from_a_labels_file_and_its_bad_rows_in_one_line(tmp_path):
    """--labels rows had been read with bare json.loads and r["text"]: a bad row was Python's "'text'" or
    "Expecting value: line 1 column 10" naming neither file nor line, and an --out directory failed after the work
    naming a temporary file."""
    from typer.testing import CliRunner

    from herd.data.cli import app

    rows = [{"text": f"good clean prose number {i}", "label": "high"} for i in range(10)]
    rows += [{"text": f"buy cheap spam {i} now", "label": "low"} for i in range(10)]
    good = tmp_path / "labels.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["train-classifier", "--labels", str(good), "--out", str(tmp_path / "q.npz")])
    assert result.exit_code == 0, result.output
    assert HashedLinearClassifier.load(tmp_path / "q.npz").classes == ["high", "low"]
    assert "16 train / 4 held out, held-out accuracy" in result.output
    for bad, says in (('{"text": "x", "label": }', "labels.jsonl:3: not valid JSON"),
                      ('{"label": "high"}', 'labels.jsonl:3: "text" must be a string, got null'),
                      ('["x", "high"]', "labels.jsonl:3: a row must be a JSON object"),
                      ('{"text": 5, "label": "low"}', 'labels.jsonl:3: "text" must be a string, got 5'),
                      ('{"text": "x"}', 'labels.jsonl:3: "label" must be a string, got null')):
        (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + bad + "\n")
        result = CliRunner().invoke(app, ["train-classifier", "--labels", str(good), "--out", str(tmp_path / "b.npz")])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code != 0 and len(lines) == 1 and says in lines[0], result.output
    (tmp_path / "adir").mkdir()
    result = CliRunner().invoke(app, ["train-classifier", "--labels", str(good), "--out", str(tmp_path / "adir")])
    assert result.exit_code != 0 and f"cannot write {tmp_path / 'adir'}: Is a directory" in result.output


def test_train_classifier_samples_without_holding_every_document(tmp_path, monkeypatch):
    """Every input document had been read into one list to pick --sample of them (509 MB for 200 MB of JSONL): the
    sample is a seeded reservoir, so only --sample documents' texts are held while reading."""
    import weakref

    import herd
    from typer.testing import CliRunner

    from herd.data import classify, readers
    from herd.data.cli import app

    live = {"now": 0, "max": 0}

    def gone():
        live["now"] -= 1

    def fake_read(path, *args, **kwargs):
        for i in range(2000):
            doc = Document(f"{path}:{i}", f"document {i}")
            live["now"] += 1
            live["max"] = max(live["max"], live["now"])
            weakref.finalize(doc, gone)
            yield doc

    picked = []

    def fake_label(texts, judge, task):
        picked.append(texts)
        return ["high" if int(t.split()[1]) % 2 else "low" for t in texts]

    (tmp_path / "in.jsonl").write_text("")
    monkeypatch.setattr(readers, "read", fake_read)
    monkeypatch.setattr(herd, "load", lambda judge: None)
    monkeypatch.setattr(classify, "model_judge", lambda model, task: None)
    monkeypatch.setattr(classify, "label_texts", fake_label)
    for out in ("a.npz", "b.npz"):
        result = CliRunner().invoke(app, ["train-classifier", str(tmp_path / "in.jsonl"), "--sample", "20",
                                          "--seed", "3", "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    assert live["max"] <= 2
    assert picked[0] == picked[1] and len(picked[0]) == len(set(picked[0])) == 20
    numbers = [int(t.split()[1]) for t in picked[0]]
    assert numbers == sorted(numbers) and numbers[-1] >= 1000  # in input order, drawn from the whole input
