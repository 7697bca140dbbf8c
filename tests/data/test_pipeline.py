"""`herd data run` end to end on real Debian text with planted cases: what each stage removes and keeps,
that every input document is accounted for exactly once, and that the shards hold exactly the kept texts."""
from __future__ import annotations

import dataclasses
import gzip
import json
import random
import re
from collections import Counter
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from herd.data import pipeline
from herd.data.cli import app
from herd.data.config import ConfigError, StageSpec, config_from_dict, default_config, load_config
from herd.data.document import Dropped, StageResult
from herd.data.executors import LocalExecutor
from herd.data.planted import jaccard
from herd.data.shards import TokenShards

runner = CliRunner()


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    """Broken records beside good ones: the broken ones are dropped at `read` with a reason, the rest kept."""
    root = tmp_path_factory.mktemp("malformed")
    good = "Debian packages are built from source packages. " * 30
    lines = [json.dumps({"id": "ok-1", "text": good + "one"}), "{not json", json.dumps({"id": "no-text"}),
             json.dumps({"id": "bad-text", "text": 7}), json.dumps(["a list"]), json.dumps({"id": "ok-2", "text": good + "two"})]
    (root / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    data = gzip.compress((json.dumps({"id": "gz-1", "text": good + "three"}) + "\n" + '{"id": "gz-2"').encode() * 3)
    (root / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def default_run(planted_corpus, malformed, tmp_path_factory):
    """The default pipeline (with the real Llama 3 tokenizer) over the planted corpus, on two worker processes."""
    out = tmp_path_factory.mktemp("run")
    config = dataclasses.replace(default_config(), docs_per_unit=60)  # several units per file: dedup crosses units
    inputs = planted_corpus.files + sorted(malformed.iterdir())
    executor = LocalExecutor(workers=2, progress=False)
    try:
        result = pipeline.run(inputs, out, config, executor)
    finally:
        executor.close()
    kept = {r["id"]: r for r in jsonl(out / "kept.jsonl")}
    dropped = {r["id"]: r for r in jsonl(out / "dropped.jsonl")}
    return out, result, kept, dropped


def test_every_input_document_is_kept_or_dropped_exactly_once(default_run, planted_corpus):
    out, result, kept, dropped = default_run
    kept_ids = [r["id"] for r in jsonl(out / "kept.jsonl")]
    dropped_ids = [r["id"] for r in jsonl(out / "dropped.jsonl")]
    assert len(kept_ids) == len(set(kept_ids)) and len(dropped_ids) == len(set(dropped_ids))
    assert not set(kept_ids) & set(dropped_ids)
    corpus_ids = {d.id for d in planted_corpus.docs}
    assert corpus_ids <= set(kept_ids) | set(dropped_ids)
    assert result.report["input"]["docs"] == len(kept_ids) + len(dropped_ids)
    assert all(set(r) >= {"id", "stage", "reason"} and r["reason"] for r in dropped.values())
    assert all(set(r) >= {"id", "url", "text", "lang", "scores"} for r in kept.values())


def test_malformed_records_are_dropped_at_read_with_a_reason_and_nothing_else_is_lost(default_run):
    _, result, kept, dropped = default_run
    assert {"ok-1", "ok-2"} <= set(kept) | set(dropped)
    assert dropped.get("no-text", {}).get("reason") == "missing_text:'text' is not a key; available keys: ['id']"
    assert dropped.get("bad-text", {}).get("reason") == "text_not_a_string"
    read_reasons = Counter(r["reason"] for r in dropped.values() if r["stage"] == "read")
    assert read_reasons["invalid_json"] == 1 and read_reasons["not_an_object"] == 1
    assert read_reasons["truncated_input"] >= 1
    assert result.report["stages"][0]["docs_dropped"] == sum(read_reasons.values())


def first_of(reason: str) -> str:
    """The record id in a reason such as "exact_duplicate_of:d17@/path/a.jsonl:17"."""
    first = reason.split(":", 1)[1]
    return first.rsplit("@", 1)[0]


def test_duplicates_are_removed_by_the_stage_meant_for_them(default_run, planted_corpus):
    _, result, kept, dropped = default_run
    order = [r["stage"] for r in result.report["stages"]]

    def reached(doc_id, stage):
        return doc_id in kept or order.index(dropped[doc_id]["stage"]) >= order.index(stage)

    for planted, stage, recall in ((planted_corpus.exact_dups, "exact_dedup", 1.0),
                                   (planted_corpus.near_dups, "minhash_dedup", 0.9),
                                   (planted_corpus.url_dups, "url_dedup", 1.0)):
        # a copy is a duplicate only if its original got as far: else it is the first occurrence left
        both = [c for c in planted if reached(c, stage) and reached(planted[c], stage)]
        assert len(both) >= len(planted) / 2, stage
        caught = [c for c in both if dropped.get(c, {}).get("stage") == stage]
        assert len(caught) >= recall * len(both), (stage, sorted(set(both) - set(caught)))
        # the reason names the first occurrence, which is the original: its own id at its place in the input
        assert all(first_of(dropped[c]["reason"]) == planted[c] for c in caught), stage
        # precision: the stage drops nothing but the planted copies, and (near-duplicates) documents at
        # least 0.6 similar to the one named, the zone where either call is right (see test_dedup)
        others = {i: first_of(r["reason"]) for i, r in dropped.items() if r["stage"] == stage}.items()
        others = [(i, first) for i, first in others if i not in planted]
        by_id = planted_corpus.by_id()
        assert stage == "minhash_dedup" or not others, stage
        assert all(jaccard(by_id[i].text, by_id[first].text) >= 0.6 for i, first in others), others


def test_spam_and_adult_content_are_dropped_and_clean_text_kept(default_run, planted_corpus):
    _, _, kept, dropped = default_run
    assert not set(planted_corpus.spam) & set(kept)
    assert not set(planted_corpus.nsfw) & set(kept)
    assert all(dropped[i]["stage"] == "nsfw" for i in planted_corpus.nsfw)
    clean_html_kept = len(planted_corpus.clean_html & set(kept)) / len(planted_corpus.clean_html)
    assert clean_html_kept >= 0.8  # precision: the real manual pages are what the filters are for


def test_boilerplate_lines_removed_pii_masked_in_the_kept_text(default_run, planted_corpus):
    _, _, kept, _ = default_run
    for r in kept.values():
        assert not any(line in r["text"] for line in planted_corpus.boilerplate), r["id"]
    for doc_id, secrets in planted_corpus.pii.items():
        if doc_id in kept:
            assert not any(s in kept[doc_id]["text"] for s in secrets), doc_id
    twice = [kept[i]["text"] for i in planted_corpus.twice_docs if i in kept]
    assert twice and all(planted_corpus.twice_line in t for t in twice)  # a line seen twice is not boilerplate


def test_shards_decode_to_the_kept_texts_exactly(default_run):
    from herd.tokenizer import load_tokenizer

    out, result, kept, _ = default_run
    tok = load_tokenizer()
    shards = TokenShards(out, verify=True)
    assert len(shards) == len(kept) == result.manifest["documents"]
    texts = [r["text"] for r in jsonl(out / "kept.jsonl")]
    for i, (tokens, text) in enumerate(zip(shards, texts)):
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        assert tok.decode(tokens[1:-1].tolist()) == text
        assert shards.doc_id(i) == list(kept)[i]


def test_report_agrees_with_the_audit_files(default_run):
    out, result, kept, dropped = default_run
    per_stage = Counter(r["stage"] for r in dropped.values())
    rows = {r["stage"]: r for r in result.report["stages"]}
    assert [r["stage"] for r in result.report["stages"]][:2] == ["read", "language"]
    for stage, row in rows.items():
        assert row["docs_dropped"] == per_stage.get(stage, 0), stage
    last = result.report["stages"][-1]
    assert last["docs_kept"] == len(kept) and last["tokens_kept"] == result.manifest["tokens"]
    langs = result.report["languages"]
    assert sum(v["kept"]["docs"] for v in langs.values()) == len(kept)
    assert langs["en"]["kept"]["docs"] > langs.get("de", {"kept": {"docs": 0}})["kept"]["docs"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_drop_rates_with_examples_that_lead_back_to_the_input(default_run, malformed):
    out, result, kept, dropped = default_run
    by_id = {d["id"]: d for d in dropped.values()}
    for row in result.report["stages"]:
        assert row["drop_rate"] == pytest.approx(row["docs_dropped"] / row["docs_in"])
        assert bool(row["examples"]) == bool(row["docs_dropped"]), row["stage"]
        kinds = Counter(e["reason"].split(":")[0] for e in row["examples"])
        assert max(kinds.values(), default=0) <= 2  # at most two of a kind, so rarer reasons show too
        assert len(row["examples"]) == min(6, sum(min(2, n) for n in row["reasons"].values()))
        for e in row["examples"]:
            record = by_id[e["id"]]  # every example is a real drop, with the input place its audit record names
            assert (record["stage"], record["reason"], record["source"]) == (row["stage"], e["reason"], e["source"])
    # every drop of every stage names the input file (and line) it came from
    assert all(r["source"] and ":" in r["source"] for r in dropped.values())
    read_drops = [r for r in dropped.values() if r["stage"] == "read"]
    mixed = str(malformed / "mixed.jsonl")
    assert {r["source"] for r in read_drops if r["source"].startswith(mixed)} == {f"{mixed}:{n}" for n in (2, 3, 4, 5)}
    nsfw = next(r for r in result.report["stages"] if r["stage"] == "nsfw")
    planted = {e["id"]: e["text"] for e in nsfw["examples"]}
    assert planted and all(len(t) <= 240 and t for t in planted.values())
    # the terminal report prints them
    from rich.console import Console

    from herd.data.report import render

    console = Console(width=300, record=True)
    render(result.report, console)
    shown = console.export_text()
    assert "examples of dropped text" in shown and f"{mixed}:2" in shown


# --- the pipeline's own guarantees, with tiny stages --------------------------------------------------


@dataclass
class Loses:
    """A broken stage: it forgets a document."""

    name: str = "loses"

    def __call__(self, docs):
        return StageResult(docs[1:], [])


@dataclass
class Upper:
    name: str = "upper"

    def __call__(self, docs):
        return StageResult([dataclasses.replace(d, text=d.text.upper()) for d in docs[1:]],
                           [Dropped(d.id, "whatever", "first") for d in docs[:1]])


@dataclass
class Halves:
    """A domain for every document, as a domain classifier would give: half code, half general."""

    name: str = "halves"
    sets_domain: bool = True

    def __call__(self, docs):
        return StageResult([dataclasses.replace(d, meta={"domain": ("code", "general")[int(d.name) % 2]})
                            for d in docs], [])


@dataclass
class DefIsCode:
    """A classifier that calls a document code when it starts with "def ", general otherwise."""

    name: str = "def_is_code"
    sets_domain: bool = True

    def __call__(self, docs):
        return StageResult([dataclasses.replace(d, meta={"domain": "code" if d.text.startswith("def ") else "general"})
                            for d in docs], [])


def tiny(tmp_path, n=5):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document number {i}"}) + "\n" for i in range(n)))
    return path


def test_a_stage_that_loses_documents_stops_the_run(tmp_path):
    config = dataclasses.replace(default_config(), stages=(StageSpec(f"{__name__}:Loses"),))
    with pytest.raises(pipeline.PipelineError, match="loses"):
        pipeline.run([tiny(tmp_path)], tmp_path / "out", config, LocalExecutor(1, progress=False))


def test_dropped_records_carry_the_pipeline_stage_name(tmp_path):
    from herd.data.config import ShardConfig

    config = dataclasses.replace(default_config(), stages=(StageSpec(f"{__name__}:Upper"),),
                                 shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"), docs_per_unit=2)
    out = tmp_path / "out"
    pipeline.run([tiny(tmp_path)], out, config, LocalExecutor(1, progress=False))
    dropped = jsonl(out / "dropped.jsonl")
    assert [(r["id"], r["stage"]) for r in dropped] == [("d0", "upper"), ("d2", "upper"), ("d4", "upper")]
    assert [r["text"] for r in jsonl(out / "kept.jsonl")] == ["DOCUMENT NUMBER 1", "DOCUMENT NUMBER 3"]


def test_the_report_counts_the_input_tokens_as_its_stage_rows_do(tmp_path):
    """report.json's input tokens had always been 0: the readers count records and bytes, not tokens."""
    from herd.data.config import ShardConfig

    config = dataclasses.replace(default_config(), stages=(StageSpec(f"{__name__}:Upper"),),
                                 shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"), docs_per_unit=2)
    report = pipeline.run([tiny(tmp_path)], tmp_path / "out", config, LocalExecutor(1, progress=False)).report
    assert report["input"]["tokens"] == 5 * len("document number 0") + 5 * 2  # a BOS and an EOS each
    assert report["input"]["tokens"] == report["stages"][0]["tokens_in"]
    assert report["input"]["docs"] == report["stages"][0]["docs_in"] == 5


def test_a_directory_is_only_resumed_by_the_run_that_started_it(tmp_path):
    from herd.data.config import ShardConfig

    config = dataclasses.replace(default_config(), stages=(StageSpec(f"{__name__}:Upper"),),
                                 shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"))
    pipeline.run([tiny(tmp_path)], tmp_path / "out", config, LocalExecutor(1, progress=False))
    with pytest.raises(pipeline.PipelineError, match="another configuration"):
        pipeline.run([tiny(tmp_path)], tmp_path / "out", dataclasses.replace(config, docs_per_unit=3),
                     LocalExecutor(1, progress=False))


def test_a_run_is_not_resumed_with_a_classifier_rewritten_at_its_path(tmp_path):
    """The run's fingerprint had held the classifier's path alone: a model retrained into the same file labelled the
    rest of a resumed run, two classifiers' labels in one mix."""
    from herd.data.classify import HashedLinearClassifier
    from herd.data.config import ShardConfig

    model = tmp_path / "quality.npz"
    texts = ["document number one", "spam spam spam"] * 5

    def train(labels):
        HashedLinearClassifier.fit(texts, labels * 5).save(model)

    train(["high", "low"])
    config = dataclasses.replace(default_config(), shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"),
                                 stages=(StageSpec("quality_classifier", {"path": str(model), "threshold": 0.0}),))
    src = tiny(tmp_path)
    pipeline.run([src], tmp_path / "out", config, LocalExecutor(1, progress=False))
    pipeline.run([src], tmp_path / "out", config, LocalExecutor(1, progress=False))  # the same file: it resumes
    train(["low", "high"])
    with pytest.raises(pipeline.PipelineError, match="holds a run with other inputs, another configuration or other "
                                                     "files its stages read; use a new --out directory"):
        pipeline.run([src], tmp_path / "out", config, LocalExecutor(1, progress=False))


def test_the_mix_keeps_the_same_documents_however_the_input_path_is_spelled(tmp_path, monkeypatch):
    from herd.data.config import MixConfig, ShardConfig

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "text": f"document {i} " * (i % 7 + 1)}) + "\n"
                           for i in range(60)))
    config = dataclasses.replace(default_config(), stages=(StageSpec(f"{__name__}:Halves"),),
                                 shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"),
                                 mix=MixConfig(targets={"general": 0.8, "code": 0.2}))
    monkeypatch.chdir(tmp_path)
    kept = []
    for i, path in enumerate((src, src.relative_to(tmp_path))):
        pipeline.run([path], tmp_path / f"out{i}", config, LocalExecutor(1, progress=False))
        kept.append([(r["id"], r["repeats"]) for r in jsonl(tmp_path / f"out{i}" / "kept.jsonl")])
    assert kept[0] == kept[1] and 0 < len(kept[0]) < 60


# --- configuration and the CLI ------------------------------------------------------------------------


def test_toml_config_round_trip_and_errors(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('docs_per_unit = 50\n[shards]\nmax_tokens_per_shard = 1000\n[mix]\nseed = 7\n'
                    '[[stages]]\ntype = "language"\nlanguages = ["en"]\n[[stages]]\ntype = "exact_dedup"\n')
    config = load_config(path)
    assert config.docs_per_unit == 50 and config.mix.seed == 7 and config.shards.max_tokens_per_shard == 1000
    assert config.stages[0] == StageSpec("language", {"languages": ["en"]})
    assert config.stages[0].build().languages == ["en"]
    path.write_text('[[stages]]\ntype = "language"\nlanguagez = ["en"]\n')
    with pytest.raises(ConfigError,
                       match=r"stage 'language' has no option 'languagez'; its options: name, languages, min_score$"):
        load_config(path).stages[0].build()
    # Tables where an array of them belongs had been "dictionary update sequence element #0 has length 1".
    for tables in ('[stages]\ntype = "nsfw"\n', '[stages.first]\ntype = "nsfw"\n'):
        path.write_text(tables)
        with pytest.raises(ConfigError, match=r"stages must be \[\[stages\]\] tables, one per stage"):
            load_config(path)
    path.write_text('[mix]\ntargets = {code = 0.7, general = 0.7}\n[[stages]]\ntype = "nsfw"\n')
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(path)


@pytest.mark.parametrize(("stage", "words"), [
    ({"type": "gopher_quality", "min_words": "50"}, "min_words must be int, got '50'"),
    ({"type": "gopher_quality", "min_words": True}, "min_words must be int, got True"),
    ({"type": "c4_quality", "filter_curly_bracket": 1}, "filter_curly_bracket must be bool, got 1"),
    ({"type": "gopher_quality", "min_words": 60, "max_words": 50}, "min_words (60) must not exceed max_words (50)"),
    ({"type": "gopher_quality", "min_alpha_words_ratio": float("nan")}, "min_alpha_words_ratio must be in [0, 1]"),
    ({"type": "gopher_repetition", "max_dup_line_frac": -0.1}, "max_dup_line_frac must be in [0, 1]"),
    ({"type": "gopher_repetition", "top_ngram_char_fracs": [[2, 1.5]]}, "top_ngram_char_fracs must be pairs"),
    ({"type": "fineweb_quality", "short_line_length": -1}, "short_line_length must be at least 0"),
    ({"type": "language", "min_score": 2.0}, "min_score must be in [0, 1]"),
    ({"type": "nsfw", "domains_file": "nope.txt"}, "domains_file 'nope.txt' is not among herd's shipped lists"),
    ({"type": "minhash_dedup", "threshold": float("nan")}, "threshold must be in [0, 1]"),
    ({"type": "minhash_dedup", "ngram": 0}, "ngram must be in [1, 100], got 0"),
    ({"type": "minhash_dedup", "num_perm": 0}, "num_perm must be in [1, 65536], got 0"),
    ({"type": "minhash_dedup", "bands": 1, "rows": 6}, "bands must be at least 2, got 1"),
    ({"type": "line_dedup", "max_count": 0}, "max_count must be at least 1, got 0"),
    ({"type": "quality_classifier", "path": "nope.npz"}, "path: classifier not found: nope.npz"),
    ({"type": "domain_classifier", "path": "nope.npz"}, "path: classifier not found: nope.npz"),
])
def test_stage_options_out_of_range_or_of_the_wrong_type_are_one_line(tmp_path, stage, words):
    """Before: a NaN threshold or a negative ratio ran and silently kept or dropped everything, a string for a
    number failed in a worker mid-run, `ngram` 0 with a TypeError and 10**12 hung building its table."""
    inputs = [tmp_path / "in.jsonl"]
    inputs[0].write_text(json.dumps({"id": "1", "text": "A line of text."}) + "\n")
    with pytest.raises(ConfigError, match=f"stage '{stage['type']}': " + re.escape(words)):
        pipeline.run(inputs, tmp_path / "out", config_from_dict({"stages": [stage]}))
    assert not (tmp_path / "out").exists()  # not claimed: the corrected configuration may use it


@pytest.mark.parametrize(("raw", "words"), [
    ({"shards": {"max_tokens_per_shard": 0}}, "max_tokens_per_shard must be at least 1"),
    ({"mix": {"targets": {"general": float("nan")}}}, "mix targets general must be at least 0, got nan"),
    # had read "must be non-negative and sum to 1 (they sum to 1)", naming neither the target nor what was wrong
    ({"mix": {"targets": {"web": 1.5, "code": -0.5}}}, "mix targets code must be at least 0, got -0.5"),
    ({"mix": {"targets": {"web": 0.5, "code": 0.4}}}, "mix targets must sum to 1 (they sum to 0.9)"),
])
def test_pipeline_numbers_out_of_range_are_one_line(raw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        config_from_dict({**raw, "stages": [{"type": "exact_dedup"}]})


@pytest.mark.parametrize(("toml", "words"), [
    ('docs_per_unit = "10"', "docs_per_unit must be int, got '10'"),  # had been "'<' not supported between..."
    ("docs_per_unit = 10.0", "docs_per_unit must be int, got 10.0"),
    ("shards = {max_tokens_per_shard = 1.5}", "shards: max_tokens_per_shard must be int, got 1.5"),  # 1 doc a shard
    ('shards = {eos = "yes"}', "shards: eos must be bool, got 'yes'"),
    ("mix = {max_repeats = 2.5}", "mix: max_repeats must be int, got 2.5"),
    ('mix = {targets = {web = "1"}}', "mix targets web must be a number, got '1'"),
    ('mix = {enabled = "no"}', "mix: enabled must be bool, got 'no'"),
])
def test_pipeline_values_of_the_wrong_type_name_the_file_and_key(tmp_path, toml, words):
    path = tmp_path / "p.toml"
    path.write_text(f'{toml}\n[[stages]]\ntype = "exact_dedup"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {words}")):
        load_config(path)


def test_a_shards_tokenizer_that_gives_no_tokenizer_is_refused_before_the_run(tmp_path):
    inputs = [tmp_path / "in.jsonl"]
    inputs[0].write_text(json.dumps({"id": "1", "text": "A line of text."}) + "\n")
    config = config_from_dict({"shards": {"tokenizer": "os:getcwd"}, "stages": [{"type": "exact_dedup"}]})
    with pytest.raises(ConfigError, match="shards.tokenizer 'os:getcwd' gives a str, not a tokenizer"):
        pipeline.run(inputs, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def _one_line_error(result):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("herd: error:"), result.output
    return lines[0]


def test_cli_missing_input_is_one_line(tmp_path):
    line = _one_line_error(runner.invoke(app, ["run", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]))
    assert "nope.jsonl" in line


def test_cli_malformed_toml_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[stages]\ntype = 'language'\n")
    line = _one_line_error(runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "o"),
                                               "--config", str(bad)]))
    assert "invalid TOML" in line
    bad.write_text('[[stages]]\ntype = "no_such_stage"\n')
    line = _one_line_error(runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "o"),
                                               "--config", str(bad)]))
    assert "no_such_stage" in line


def test_cli_toml_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[[stages]]\n")  # had been "'utf-8' codec can't decode byte 0xff", no file named
    line = _one_line_error(runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "o"),
                                               "--config", str(bad)]))
    assert f"{bad}: not UTF-8 text (invalid start byte at byte 0)" in line


def test_cli_out_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "o"  # as /proc/x: had been "not found: /proc/x"
    line = _one_line_error(runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(out)]))
    assert f"--out {out} cannot be made (Not a directory); give a directory you can write to" in line


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_cli_workers_below_one_is_a_usage_error(tmp_path, workers):
    result = runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "o"), "--quiet",
                                 "--workers", workers])
    assert result.exit_code == 2 and "--workers" in result.output, result.output
    assert not (tmp_path / "o").exists()


def _byte_config(tmp_path, stage='type = "exact_dedup"'):
    config = tmp_path / "p.toml"
    config.write_text(f'[shards]\ntokenizer = "herd.data.shards:ByteTokenizer"\n[[stages]]\n{stage}\n')
    return config


@pytest.mark.parametrize(("name", "data", "why"), [
    ("fake.jsonl.gz", json.dumps({"id": "1", "text": "not compressed"}).encode() + b"\n", "not_gzip"),
    ("bin.jsonl", bytes(range(128, 256)) * 8, "invalid_utf8"),
    ("empty.jsonl", b"", "no records"),
], ids=["not_gzip", "binary", "empty"])
def test_cli_inputs_that_cannot_be_read_are_an_error_alone_and_a_warning_beside_others(tmp_path, name, data, why):
    """Each had finished with status 0 and "0 documents", and under --quiet said nothing."""
    bad = tmp_path / name
    bad.write_bytes(data)
    config = _byte_config(tmp_path)
    line = _one_line_error(runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "o"), "--quiet",
                                               "--config", str(config)]))
    assert f"no document could be read from any input: {bad} ({why}" in line
    # the failed run does not hold --out: the corrected inputs had been refused it ("holds a run with other inputs")
    fixed = runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "o"), "--quiet",
                                "--config", str(config)])
    assert fixed.exit_code == 0, fixed.output
    result = runner.invoke(app, ["run", str(tiny(tmp_path)), str(bad), "--out", str(tmp_path / "o2"), "--quiet",
                                 "--config", str(config)])
    assert result.exit_code == 0, result.output
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"herd: warning: no document could be read from {bad} "
                                                         f"({why}"), result.stderr


def test_cli_truncated_input_is_a_warning_and_filtered_out_input_is_no_error(tmp_path):
    text = "".join(json.dumps({"id": f"d{i}", "text": random_text(i)}) + "\n" for i in range(300)).encode()
    data = gzip.compress(text)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["run", str(cut), "--out", str(tmp_path / "o"), "--quiet",
                                 "--config", str(_byte_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"herd: warning: {re.escape(str(cut))}: read only in part, \d+ documents before the file "
                        r"broke off \(truncated_input\)", result.stderr.strip()), result.stderr
    # readable, every document filtered out: a run that kept nothing, not an unreadable input
    config = _byte_config(tmp_path, 'type = "gopher_quality"\nmin_words = 1000\nmax_words = 2000')
    result = runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "o2"), "--quiet",
                                 "--config", str(config)])
    assert result.exit_code == 0 and not result.stderr, result.output


def test_cli_quiet_keeps_the_one_line_result(tmp_path):
    """--quiet promises no progress bars or tables; it had hidden the result line too, leaving nothing said."""
    result = runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "o"), "--quiet",
                                 "--config", str(_byte_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"[\d,]+ documents, [\d,]+ tokens in 1 shard\(s\) under {re.escape(str(tmp_path / 'o'))}\n",
                        result.stdout), result.stdout


def random_text(seed):
    return random.Random(seed).randbytes(60).hex()  # incompressible, so half the file holds many records


def test_cli_warns_when_a_scarce_domain_shrinks_the_mix(tmp_path):
    """One document labelled code kept its whole 25% share at 4 copies, so the mix kept 40% of the tokens: exit 0 and
    no word of why."""
    config = tmp_path / "p.toml"
    config.write_text('[shards]\ntokenizer = "herd.data.shards:ByteTokenizer"\n'
                      '[mix]\ntargets = { general = 0.75, code = 0.25 }\n'
                      f'[[stages]]\ntype = "{__name__}:DefIsCode"\n')
    src = tmp_path / "in.jsonl"
    texts = ["def f(): return 17"] + [f"document number {i}" for i in range(10, 49)]  # 18 bytes each
    src.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    result = runner.invoke(app, ["run", str(src), "--out", str(tmp_path / "o"), "--config", str(config),
                                 "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    # 39 general documents and 1 code one of 20 tokens each: code's 4 copies are a quarter of 320 tokens
    said = ("herd: warning: the mix keeps 320 of 800 tokens (40.0%): domain 'code' holds 20 tokens for a 25% share, "
            "met by at most 4 copies, and the others shrink to match; lower its target in [mix], or add code documents")
    assert result.stderr.splitlines() == [said]
    mix = json.loads((tmp_path / "o" / "report.json").read_text())["mix"]
    assert mix["limited_by"] == "code" and mix["warning"] == said.removeprefix("herd: warning: ")
    assert "warning: the mix keeps 320 of 800" in runner.invoke(app, ["report", str(tmp_path / "o")]).output


def test_cli_unknown_executor_and_report_of_a_non_run(tmp_path):
    _one_line_error(runner.invoke(app, ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "o"),
                                        "--executor", "spark"]))
    _one_line_error(runner.invoke(app, ["report", str(tmp_path)]))


def test_cli_run_then_report(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('[shards]\ntokenizer = "herd.data.shards:ByteTokenizer"\n'
                      '[[stages]]\ntype = "exact_dedup"\n')
    src = tiny(tmp_path)
    with open(src, "a") as fh:
        fh.write(json.dumps({"id": "copy", "text": "document number 1"}) + "\n")
    result = runner.invoke(app, ["run", str(src), "--out", str(tmp_path / "o"), "--config", str(config),
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "exact_dedup" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "o")])
    assert result.exit_code == 0 and "exact_dedup" in result.output
    assert (tmp_path / "o" / "report.png").exists()


def test_inputs_may_repeat_each_others_ids(tmp_path):
    """Two shards of one dataset both count from 0; a line escapes half of a UTF-16 pair. The run keeps every
    record's own id, drops only the real duplicate (naming its original's place) and the unencodable line."""
    from herd.data.config import ShardConfig

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"id": str(i), "text": f"first shard, text {i}"}) + "\n" for i in range(4)))
    b.write_text("".join(json.dumps({"id": str(i), "text": f"second shard, text {i}"}) + "\n" for i in range(3))
                 + json.dumps({"id": "0", "text": "first shard, text 2"}) + "\n"  # a copy of a.jsonl's third
                 + '{"id": "9", "text": "half a pair \\ud800 here"}\n')
    config = dataclasses.replace(default_config(), stages=(StageSpec("exact_dedup"),),
                                 shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"), docs_per_unit=2)
    out = tmp_path / "out"
    pipeline.run([a, b], out, config, LocalExecutor(1, progress=False))
    kept, dropped = jsonl(out / "kept.jsonl"), jsonl(out / "dropped.jsonl")
    assert [(r["id"], r["text"]) for r in kept] == [(str(i), f"first shard, text {i}") for i in range(4)] + [
        (str(i), f"second shard, text {i}") for i in range(3)]
    assert sorted((r["id"], r["reason"].split("@")[0], r["source"]) for r in dropped) == [
        ("0", "exact_duplicate_of:2", f"{b}:4"), (pipeline.doc_id(f"{b}:5"), "unpaired_surrogate", f"{b}:5")]
    assert dropped[0]["reason"].endswith(f"@{a}:3") or dropped[1]["reason"].endswith(f"@{a}:3")
    shards = TokenShards(out, verify=True)
    assert [shards.doc_id(i) for i in range(len(shards))] == [r["id"] for r in kept]


def test_a_dropped_documents_snippet_is_its_start_with_whitespace_collapsed():
    """Read from the text's start only (every dropped document had been split and joined whole)."""
    import random

    from herd.data.report import SNIPPET_CHARS, _snippet

    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("ab \n\t") for _ in range(rng.randint(0, 3 * SNIPPET_CHARS)))
        assert _snippet(text) == " ".join(text.split())[:SNIPPET_CHARS]


def test_input_metadata_reaches_kept_and_dropped_jsonl(tmp_path):
    """A JSONL line's other fields (a Parquet row's other columns) had been read as metadata and then written
    nowhere."""
    from herd.data.config import ShardConfig

    src = tmp_path / "rp.jsonl"
    rows = [{"id": "a", "text": "the first text", "meta": {"lang": "en"}, "dump": "CC-2024"},
            {"id": "b", "text": "the first text", "dump": "CC-2023"},  # an exact copy: dropped with its meta
            {"id": "c", "text": "no metadata here"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dataclasses.replace(default_config(), stages=(StageSpec("exact_dedup"),),
                                 shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"))
    outputs = []
    for out in (tmp_path / "out1", tmp_path / "out2"):
        pipeline.run([src], out, config, LocalExecutor(1, progress=False))
        outputs.append(((out / "kept.jsonl").read_bytes(), (out / "dropped.jsonl").read_bytes()))
    assert outputs[0] == outputs[1]
    kept, dropped = jsonl(tmp_path / "out1" / "kept.jsonl"), jsonl(tmp_path / "out1" / "dropped.jsonl")
    assert [(r["id"], r.get("meta")) for r in kept] == [
        ("a", {"meta": {"lang": "en"}, "dump": "CC-2024"}), ("c", None)]
    assert [(r["id"], r["meta"]) for r in dropped] == [("b", {"dump": "CC-2023"})]


def test_text_key_names_the_field_a_run_reads_text_from(tmp_path):
    """RedPajama names its text `raw_content`: every record had been a `missing_text` drop."""
    from herd.data.config import ShardConfig

    src = tmp_path / "rp.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "raw_content": f"text {i}"}) + "\n" for i in range(3)))
    config = dataclasses.replace(default_config(), stages=(StageSpec("exact_dedup"),), text_key="raw_content",
                                 shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"))
    pipeline.run([src], tmp_path / "out", config, LocalExecutor(1, progress=False))
    assert [r["text"] for r in jsonl(tmp_path / "out" / "kept.jsonl")] == ["text 0", "text 1", "text 2"]
    toml = tmp_path / "p.toml"
    toml.write_text('text_key = ""\n[[stages]]\ntype = "exact_dedup"\n')
    with pytest.raises(ConfigError, match="text_key must name a field"):
        load_config(toml)


def test_a_glob_matching_nothing_among_other_inputs_is_an_error(tmp_path):
    """As a missing file is: it had been skipped without a word, the run going on with the other inputs."""
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    result = runner.invoke(app, ["run", str(tmp_path / "a.jsonl"), str(tmp_path / "*.parquet"),
                                 "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1
    assert f"input not found: {tmp_path / '*.parquet'} (no file matches the pattern)" in result.output
    assert not (tmp_path / "out").exists()


def test_a_local_run_names_its_records_free_of_where_the_corpus_lies(tmp_path, monkeypatch):
    """A record without an id is named by a hash of FILE:LINE as given: the same corpus in two places gives the same
    ids, and no output holds the absolute path of the machine it ran on (which making every input absolute had
    brought into kept.jsonl and dropped.jsonl)."""
    config = _byte_config(tmp_path)
    for place in ("a", "b"):
        (tmp_path / place).mkdir()
        (tmp_path / place / "in.jsonl").write_text(
            "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(3)))
        monkeypatch.chdir(tmp_path / place)
        result = runner.invoke(app, ["run", "in.jsonl", "--out", "out", "--quiet", "--config", str(config)])
        assert result.exit_code == 0, result.output
    kept = [(tmp_path / place / "out" / "kept.jsonl").read_bytes() for place in ("a", "b")]
    assert kept[0] == kept[1] and str(tmp_path).encode() not in kept[0]
