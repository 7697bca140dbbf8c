"""Readers: every format yields the documents it holds and one Dropped per broken record, nothing else lost."""
from __future__ import annotations

import gzip
import io
import json
import random
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from herd.data.document import Document, Dropped
from herd.data.readers import doc_id, iter_inputs, read, read_file


def split(items):
    docs = [x for x in items if isinstance(x, Document)]
    dropped = [x for x in items if isinstance(x, Dropped)]
    assert len(docs) + len(dropped) == len(items)
    return docs, dropped


def test_jsonl_shards_round_trip(planted_corpus):
    docs = [d for f in planted_corpus.files for d in read(f)]
    assert all(isinstance(d, Document) for d in docs)
    assert [d.public_id for d in docs] == [d.public_id for d in planted_corpus.docs]
    assert [d.text for d in docs] == [d.text for d in planted_corpus.docs]
    assert all(d.source.startswith(str(planted_corpus.files[0].parent)) for d in docs)


def test_jsonl_malformed_records_are_dropped_with_reasons(tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "first good record", "url": "https://example.org/a"}).encode(),
        b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}',
        json.dumps({"id": "num", "text": 42}).encode(),
        json.dumps({"id": "none", "title": "no text field"}).encode(),
        b'{"id": "broken", "text": "unterminated',
        b"",
        json.dumps({"text": "no id given"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        b'{"id": "deep", "text": "x", "meta": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # had ended the file's reading
        json.dumps({"id": "z", "text": "last good record"}).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs, dropped = split(list(read(path)))
    assert [d.public_id for d in docs] == ["a", doc_id(f"{path}:7"), "z"]
    assert docs[0].url == "https://example.org/a" and docs[0].source == f"{path}:1"
    assert {(x.id, x.reason, x.source) for x in dropped} == {
        (doc_id(f"{path}:2"), "invalid_utf8", f"{path}:2"),
        ("num", "text_not_a_string", f"{path}:3"),
        ("none", "missing_text:'text' is not a key; available keys: ['id', 'title']", f"{path}:4"),
        (doc_id(f"{path}:5"), "invalid_json", f"{path}:5"),
        (doc_id(f"{path}:8"), "not_an_object", f"{path}:8"),
        (doc_id(f"{path}:9"), "nested_too_deep", f"{path}:9"),
    }


def test_a_line_longer_than_many_chunks_is_read_whole(tmp_path):
    """Each chunk is split alone (the growing line had been split again at every chunk: quadratic)."""
    from herd.data.readers import _lines

    chunks = [b"a" * 1000] * 50 + [b"b\nc" + b"d" * 999, b"\n", b"e"] + [b"f" * 1000] * 3
    assert list(_lines(iter(chunks))) == b"".join(chunks).split(b"\n")
    assert list(_lines(iter([b"x\n", b"", b"\n\ny"]))) == [b"x", b"", b"", b"y"]


def _records(n):
    rng = random.Random(n)  # incompressible text, so a cut file holds many blocks' worth of records
    return [json.dumps({"id": f"r{i:04d}", "text": f"record {i} " + rng.randbytes(60).hex()}) for i in range(n)]


def test_truncated_gzip_yields_what_was_readable_then_one_drop(tmp_path):
    recs = _records(400)
    data = gzip.compress(("\n".join(recs) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    # independent oracle: the complete lines in whatever zlib can decompress from the cut file
    readable = zlib.decompressobj(wbits=31).decompress(path.read_bytes())
    expected = [json.loads(line)["id"] for line in readable.split(b"\n")[:-1]]
    docs, dropped = split(list(read(path)))
    assert 0 < len(expected) < 400
    assert [d.public_id for d in docs] == expected
    assert [x.reason for x in dropped] == ["truncated_input"]


@pytest.mark.parametrize("name", ["fake.jsonl.gz", "fake.txt.zst", "fake.warc.gz"])
def test_a_file_not_in_its_names_compression_is_named_so_not_truncated(tmp_path, name):
    """A plain file named .gz had been dropped as `truncated_input`, as if it were a cut gzip stream."""
    path = tmp_path / name
    path.write_text(json.dumps({"id": "1", "text": "plain text"}) + "\n")
    codec = "gzip" if name.endswith(".gz") else "zstd"
    assert [(x.reason, x.source) for x in read(path)] == [(f"not_{codec}", str(path))]


def test_zstd_and_gzip_wrap_every_format(tmp_path):
    recs = _records(50)
    raw = ("\n".join(recs) + "\n").encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]) + gzip.compress(raw[len(raw) // 2 :]))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("A plain text document, compressed.".encode()))
    (tmp_path / "d.html.zstd").write_bytes(zstandard.ZstdCompressor().compress(
        b"<html><head><link rel='canonical' href='https://example.org/d'></head><body><article><p>"
        + b"Compressed HTML with a paragraph long enough to be kept by the extractor. " * 3 + b"</p></article></body></html>"))
    ids = [json.loads(r)["id"] for r in recs]
    assert [d.public_id for d in read(tmp_path / "a.jsonl.zst")] == ids
    assert [d.public_id for d in read(tmp_path / "b.jsonl.gz")] == ids  # two gzip members
    assert next(read(tmp_path / "c.txt.gz")).text == "A plain text document, compressed."
    html = next(read(tmp_path / "d.html.zstd"))
    assert html.url == "https://example.org/d" and "Compressed HTML" in html.text
    raw = ("\n".join(_records(3000)) + "\n").encode()  # several zstd blocks
    cut = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / "e.jsonl.zst").write_bytes(cut[: len(cut) // 2])
    docs, dropped = split(list(read(tmp_path / "e.jsonl.zst")))
    assert 0 < len(docs) < 3000 and [x.reason for x in dropped] == ["truncated_input"]
    assert [d.public_id for d in docs] == [f"r{i:04d}" for i in range(len(docs))]


def test_text_tree_with_bad_bytes_empty_files_and_no_extension(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Alpha document.\nSecond line.", encoding="utf-8")
    (root / "sub" / "README").write_text("A file with no extension is text too.", encoding="utf-8")
    (root / "sub" / "latin1.txt").write_bytes("Ein Käse aus Köln.".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_bytes(b"  \n\n ")
    docs, dropped = split(list(read(root)))
    by_name = {Path(d.source).name: d for d in docs}
    assert set(by_name) == {"a.txt", "README", "latin1.txt"}
    assert by_name["latin1.txt"].meta["utf8_errors"] == 2 and "K\ufffdse" in by_name["latin1.txt"].text
    assert "utf8_errors" not in by_name["a.txt"].meta
    assert {(x.id, x.reason, x.source) for x in dropped} == {
        (doc_id(str(root / "empty.txt")), "empty", str(root / "empty.txt")),
        (doc_id(str(root / "blank.txt")), "empty", str(root / "blank.txt"))}
    assert [d.public_id for d in read(root) if isinstance(d, Document)] == [d.public_id for d in docs]  # stable ids


def test_html_pages_canonical_and_og_urls_and_broken_markup(tmp_path, planted_corpus):
    page = planted_corpus.html_dir / "library" / "json.html"
    doc = next(read(page))
    assert doc.url == f"file://{page}" and doc.text.startswith("# `json` — JSON encoder and decoder")
    (tmp_path / "og.html").write_text(
        "<html><head><meta property='og:url' content='https://news.example.com/story'></head><body>"
        "<article><h1>Story</h1><p>" + "The council met on Tuesday and agreed on the new budget for schools. " * 4
        + "</p></article></body></html>", encoding="utf-8")
    (tmp_path / "broken.html").write_text(
        "<html><body><div><p>" + "Unclosed tags do not stop a browser, and they must not stop us either. " * 4
        + "<div><b>bold <i>nested", encoding="utf-8")
    (tmp_path / "nothing.html").write_text("<html><body><script>var x = 1;</script></body></html>", encoding="utf-8")
    (tmp_path / "zero.htm").write_bytes(b"")
    og = next(read(tmp_path / "og.html"))
    assert og.url == "https://news.example.com/story" and "budget for schools" in og.text
    assert "must not stop us either" in next(read(tmp_path / "broken.html")).text
    assert [(type(x).__name__, x.reason) for x in read(tmp_path / "nothing.html")] == [("Dropped", "no_text")]
    assert [(type(x).__name__, x.reason) for x in read(tmp_path / "zero.htm")] == [("Dropped", "empty")]


def _warc(gz: bool) -> tuple[bytes, list[int]]:
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=gz)
    offsets = []
    for i in range(6):
        offsets.append(buf.tell())
        ctype = "application/pdf" if i == 4 else "text/html; charset=utf-8"
        body = (f"<html><body><article><p>Page {i} of the crawl. " + "It has a paragraph of ordinary prose about the weather. " * 3
                + "</p></article></body></html>").encode()
        http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(f"https://site.example/{i}", "response",
                                                      payload=io.BytesIO(body), http_headers=http))
    offsets.append(buf.tell())
    return buf.getvalue(), offsets


@pytest.mark.parametrize("gz", [False, True], ids=["warc", "warc.gz"])
def test_warc_bad_and_truncated_records(tmp_path, gz):
    data, offsets = _warc(gz)
    bad = bytearray(data)
    # corrupt record 2's first bytes (its header, or its gzip member), and cut record 5 short
    bad[offsets[2] : offsets[2] + 12] = b"XXXXXXXXXXXX"
    bad = bytes(bad[: offsets[6] - 40])
    path = tmp_path / ("crawl.warc.gz" if gz else "crawl.warc")
    path.write_bytes(bad)
    docs, dropped = split(list(read(path)))
    # record 4 is a PDF: skipped silently, it is not a page
    assert [d.url for d in docs] == [f"https://site.example/{i}" for i in (0, 1, 3)]
    assert all(f"Page {d.url[-1]} of the crawl" in d.text for d in docs)
    assert [(x.id, x.reason, x.source) for x in dropped] == [
        (doc_id(f"{path}#2"), "bad_warc_record", f"{path}@{offsets[2]}"),
        (doc_id(f"{path}#5"), "truncated_warc_record", f"{path}@{offsets[5]}"),
    ]
    # a document names its record by offset too: the first byte of its record is where its WARC header starts
    assert [d.source for d in docs] == [f"{path}@{offsets[i]}" for i in (0, 1, 3)]
    clean = tmp_path / ("clean.warc.gz" if gz else "clean.warc")
    clean.write_bytes(data)
    assert [d.url for d in read(clean)] == [f"https://site.example/{i}" for i in (0, 1, 2, 3, 5)]


def test_iter_inputs_is_sorted_and_read_file_runs_in_a_worker(tmp_path, planted_corpus):
    for name in ("b.jsonl", "a.jsonl", "c/d.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n' if name.endswith("jsonl") else "text", encoding="utf-8")
    assert iter_inputs([tmp_path / "c", str(tmp_path / "*.jsonl")]) == [
        tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c" / "d.txt"]
    with pytest.raises(FileNotFoundError):
        iter_inputs([tmp_path / "missing.jsonl"])
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(read_file, planted_corpus.files))
    assert [d.public_id for r in results for d in r] == [d.public_id for d in planted_corpus.docs]


def test_binary_files_in_a_text_tree_are_dropped_not_read(tmp_path):
    tree = tmp_path / "fortunes"
    tree.mkdir()
    fortune = Path("/usr/share/games/fortunes/de/computer")  # a real fortune file and its binary strfile index
    (tree / "computer").write_bytes(fortune.read_bytes())
    (tree / "computer.dat").write_bytes(Path(str(fortune) + ".dat").read_bytes())
    docs, dropped = split(list(read(tree)))
    assert [Path(d.source).name for d in docs] == ["computer"]
    assert [d.reason for d in dropped] == ["binary"]


# --- malformed inputs, generated: every drop names the file and line it came from -----------------------

_GOOD = "good"


def _malformed_jsonl(rng: random.Random, n: int) -> tuple[bytes, dict[int, str]]:
    """A JSONL file of n lines, each good or broken in one of the ways real files are; line -> expected outcome."""
    kinds = ["good"] * 6 + ["invalid_utf8", "invalid_json", "not_an_object", "missing_text", "text_not_a_string",
                            "blank", "bom_good", "crlf_good"]
    lines, expect = [], {}
    for i in range(1, n + 1):
        kind = rng.choice(kinds) if i > 1 else rng.choice(["bom_good", "good"])
        rec = {"id": f"L{i}", "text": f"line {i}: " + " ".join(rng.choice(["alpha", "beta", "gamma", "naïve"])
                                                                 for _ in range(rng.randint(1, 8)))}
        # cutting a record mid-way must not also cut a character: non-ASCII only where the line stays whole
        raw = json.dumps(rec, ensure_ascii=kind == "invalid_json" or rng.random() < 0.5).encode()
        if kind == "invalid_utf8":
            raw = raw[:-2] + rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80"]) + b'"}'
        elif kind == "invalid_json":
            raw = raw[: rng.randint(1, len(raw) - 1)]
        elif kind == "not_an_object":
            raw = json.dumps(rng.choice([[1, 2], "text", 3, None])).encode()
        elif kind == "missing_text":
            raw = json.dumps({"id": f"L{i}", "body": "x"}).encode()
        elif kind == "text_not_a_string":
            raw = json.dumps({"id": f"L{i}", "text": rng.choice([1, ["a"], {"b": 1}, True])}).encode()
        elif kind == "blank":
            raw = rng.choice([b"", b"   ", b"\t"])
        elif kind == "bom_good":
            raw = b"\xef\xbb\xbf" + raw
        elif kind == "crlf_good":
            raw += b"\r"
        lines.append(raw)
        if kind != "blank":
            expect[i] = _GOOD if kind.endswith("good") else kind
    return b"\n".join(lines) + b"\n", expect


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_seeded_malformed_jsonl_every_drop_names_file_and_line(tmp_path, seed):
    rng = random.Random(seed)
    data, expect = _malformed_jsonl(rng, 200)
    path = tmp_path / f"gen-{seed}.jsonl"
    path.write_bytes(data)
    docs, dropped = split(list(read(path)))
    line_of = lambda src: int(src.rsplit(":", 1)[1])  # noqa: E731
    assert all(x.source.startswith(f"{path}:") for x in docs + dropped)
    reasons = {line_of(x.source): x.reason.split(":")[0] for x in dropped}  # missing_text names the keys after ":"
    assert {line_of(d.source): _GOOD for d in docs} | reasons == expect
    assert [d.public_id for d in docs] == [f"L{i}" for i, k in sorted(expect.items()) if k == _GOOD]
    # the text survives a BOM or a CR line end intact
    assert all(d.text.startswith(f"line {d.public_id[1:]}: ") and not d.text.endswith("\r") for d in docs)
    # gzip-compressed and cut mid-way: what was readable, then one drop naming the line it was cut in
    gz = gzip.compress(data)
    cut = tmp_path / f"gen-{seed}.jsonl.gz"
    cut.write_bytes(gz[: len(gz) * 2 // 3])
    cut_docs, cut_dropped = split(list(read(cut)))
    assert [d.public_id for d in cut_docs] == [d.public_id for d in docs[: len(cut_docs)]] and 0 < len(cut_docs) < len(docs)
    last = cut_dropped[-1]
    assert last.reason == "truncated_input" and last.source.startswith(f"{cut}:")
    assert line_of(last.source) > max(line_of(x.source) for x in cut_docs + cut_dropped[:-1])


def test_bom_opens_every_format(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"id": "first", "text": "the first record"}\n{"id": "b", "text": "x"}\n')
    (tmp_path / "b.txt").write_bytes(bom + "Plain text with a byte-order mark.".encode())
    page = b"<!doctype html><html><body><p>A page that starts with a BOM.</p></body></html>"
    (tmp_path / "c.html").write_bytes(bom + page)
    assert [d.public_id for d in read(tmp_path / "a.jsonl")] == ["first", "b"]
    assert next(read(tmp_path / "b.txt")).text == "Plain text with a byte-order mark."
    assert next(read(tmp_path / "c.html")).text == "A page that starts with a BOM."


def test_utf16_text_and_pages_are_read_as_text(tmp_path):
    """Windows tools write UTF-16 with a byte-order mark; its NUL bytes had made such files "binary"."""
    text = "Plain text in UTF-16, café and 日本語."
    (tmp_path / "le.txt").write_bytes(text.encode("utf-16"))  # the platform's order, with its BOM
    (tmp_path / "be.txt").write_bytes(b"\xfe\xff" + text.encode("utf-16-be"))
    page = "<html><head><meta charset='utf-16'></head><body><p>Une page en UTF-16, été.</p></body></html>"
    (tmp_path / "p.html").write_bytes(page.encode("utf-16"))
    (tmp_path / "odd.txt").write_bytes(b"\xff\xfe" + "cut".encode("utf-16-le") + b"\x00")  # ends mid-character
    assert next(read(tmp_path / "le.txt")).text == next(read(tmp_path / "be.txt")).text == text
    assert next(read(tmp_path / "p.html")).text == "Une page en UTF-16, été."
    assert next(read(tmp_path / "odd.txt")).reason == "binary"


def test_parquet_rows_read_as_the_same_records_in_jsonl_do(tmp_path):
    """Hugging Face datasets ship as Parquet; such a file had been dropped whole as "binary". Its rows are read as
    the same records written as JSON lines are, a row group at a time; a file cut short (its footer gone) and one
    that is not Parquet are each one drop."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}" if i % 3 else None, "text": f"row {i} text" if i != 4 else None,
             "url": f"https://example.org/{i}", "score": i / 10, "dump": "CC-MAIN-2024-10"} for i in range(7)]
    table = pa.Table.from_pylist(rows).append_column("date", pa.array([datetime.datetime(2024, 1, i + 1)
                                                                        for i in range(7)]))
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({**r, "date": f"2024-01-0{i + 1} 00:00:00"}) + "\n"
                                              for i, r in enumerate(rows)))
    from_parquet, from_jsonl = read_file(tmp_path / "t.parquet"), read_file(tmp_path / "t.jsonl")
    assert len(from_parquet) == len(from_jsonl) == 7
    for a, b in zip(from_parquet, from_jsonl):
        assert type(a) is type(b) and a.source.replace("t.parquet", "t.jsonl") == b.source
        if isinstance(a, Document):
            assert (a.text, a.url, a.name, a.meta) == (b.text, b.url, b.name, b.meta)
            assert a.id.replace("t.parquet", "t.jsonl") == b.id or a.id == doc_id(a.source)
        else:
            assert a.reason == b.reason == "missing_text:'text' is null"
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress((tmp_path / "t.parquet").read_bytes()))
    assert [d.text for d in split(read_file(tmp_path / "t.parquet.gz"))[0]] == [d.text for d in split(from_jsonl)[0]]
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "not.parquet").write_text("id,text\n1,hello\n")
    assert [d.reason for d in read_file(tmp_path / "cut.parquet")] == ["truncated_input"]
    assert [d.reason for d in read_file(tmp_path / "not.parquet")] == ["not_parquet"]


# --- encodings, WET, bz2/xz, gzip edge cases, inputs ----------------------------------------------------

_PAGES = {  # a page's text in an encoding whose bytes are not UTF-8
    "windows-1252": "Ein Käse aus Köln kostet 5 € – „gut“ und günstig, sagt der Händler aus Zürich.",
    "shift_jis": "日本語のウェブページです。文字コードはシフトJISで書かれています。東京と大阪の天気予報。",
    "gbk": "这是一个用国标码编写的中文网页。北京和上海的天气预报，欢迎阅读本站的新闻。",
}


def _page(text: str, head: str = "") -> str:
    return f"<html><head>{head}<title>t</title></head><body><article><p>{text}</p></article></body></html>"


@pytest.mark.parametrize("charset", sorted(_PAGES))
def test_pages_in_a_declared_charset_are_decoded_with_it(tmp_path, charset):
    """Every page had been decoded as UTF-8 with replacement: a windows-1252, Shift JIS or GBK page came out as
    U+FFFD, whatever its HTTP header or <meta> said. UTF-8 is still tried first, so a UTF-8 page labelled otherwise
    reads as it did."""
    text = _PAGES[charset]
    (tmp_path / "meta.html").write_bytes(_page(text, f'<meta charset="{charset}">').encode(charset))
    equiv = f'<meta http-equiv="Content-Type" content="text/html; charset={charset}">'
    (tmp_path / "equiv.htm").write_bytes(_page(text, equiv).encode(charset))
    (tmp_path / "mislabelled.html").write_bytes(_page(text, '<meta charset="iso-8859-1">').encode("utf-8"))
    for name in ("meta.html", "equiv.htm", "mislabelled.html"):
        doc = next(read(tmp_path / name))
        assert (doc.text, doc.meta) == (text, {}), name
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    for i, ctype in enumerate([f"text/html; charset={charset.upper()}", "text/html"]):
        http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(f"https://site.example/{i}", "response",
                                                      payload=io.BytesIO(_page(text).encode(charset)),
                                                      http_headers=http))
    (tmp_path / "crawl.warc.gz").write_bytes(buf.getvalue())
    # the second page declares nothing: detected (charset_normalizer)
    assert [d.text for d in read(tmp_path / "crawl.warc.gz")] == [text, text]


def test_a_page_that_says_utf_16_in_its_meta_is_not_read_as_utf_16(tmp_path):
    """A page that can declare its charset in ASCII is no UTF-16 (WHATWG reads such a label as UTF-8): decoded as
    UTF-16, a windows-1252 page had come out as CJK garbage."""
    text = _PAGES["windows-1252"]
    for label in ("utf-16", "utf-16le"):
        page = _page(text, f'<meta charset="{label}">').encode("windows-1252")
        (tmp_path / f"{label}.html").write_bytes(page + b" " * (len(page) % 2))  # an even length decodes as UTF-16
        assert next(read(tmp_path / f"{label}.html")).text == text, label


def _wet(records) -> bytes:
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    writer.write_record(writer.create_warc_record("", "warcinfo", payload=io.BytesIO(b"software: test\r\n"),
                                                  warc_content_type="application/warc-fields"))
    for url, text in records:
        writer.write_record(writer.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode()),
                                                      warc_content_type="text/plain"))
    return buf.getvalue()


def test_common_crawl_wet_files_are_read_record_by_record(tmp_path):
    """A WET file had been one plain-text document holding every record's raw WARC headers."""
    records = [(f"https://site.example/{i}", f"Page {i}\nPlain text of page {i}, café.") for i in range(3)]
    data = _wet(records + [("https://site.example/empty", "  \n")])
    (tmp_path / "CC-MAIN-0001.warc.wet.gz").write_bytes(data)
    (tmp_path / "b.wet.gz").write_bytes(data)
    (tmp_path / "c.wet").write_bytes(gzip.decompress(data))
    for name in ("CC-MAIN-0001.warc.wet.gz", "b.wet.gz", "c.wet"):
        docs, dropped = split(list(read(tmp_path / name)))
        assert [(d.url, d.text) for d in docs] == records, name
        assert [(x.url, x.reason) for x in dropped] == [("https://site.example/empty", "empty")]


def test_bz2_and_xz_wrap_every_format(tmp_path):
    """.bz2 and .xz had been read as the compressed bytes themselves: a "binary" drop."""
    import bz2
    import lzma

    recs = _records(50)
    raw = ("\n".join(recs) + "\n").encode()
    ids = [json.loads(r)["id"] for r in recs]
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(raw[:1000]) + bz2.compress(raw[1000:]))  # two streams
    (tmp_path / "b.jsonl.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress("Plain text, xz.".encode()))
    (tmp_path / "d.wet.bz2").write_bytes(bz2.compress(gzip.decompress(_wet([("https://x.example/", "WET text")]))))
    assert [d.public_id for d in read(tmp_path / "a.jsonl.bz2")] == ids
    assert [d.public_id for d in read(tmp_path / "b.jsonl.xz")] == ids
    assert next(read(tmp_path / "c.txt.xz")).text == "Plain text, xz."
    assert [d.text for d in read(tmp_path / "d.wet.bz2")] == ["WET text"]
    cut = lzma.compress(("\n".join(_records(3000)) + "\n").encode())
    (tmp_path / "e.jsonl.xz").write_bytes(cut[: len(cut) // 2])
    docs, dropped = split(list(read(tmp_path / "e.jsonl.xz")))
    assert 0 < len(docs) < 3000 and [x.reason for x in dropped] == ["truncated_input"]
    (tmp_path / "f.jsonl.bz2").write_text('{"text": "not compressed"}\n')
    assert [x.reason for x in read(tmp_path / "f.jsonl.bz2")] == ["not_bz2"]


def test_gzip_zero_padding_is_skipped_as_gzip_open_skips_it(tmp_path):
    """Zero padding after a gzip member had been a `truncated_input`, the file "read only in part"."""
    recs = _records(400)
    raw = ("\n".join(recs) + "\n").encode()
    padded = gzip.compress(raw[:5000]) + b"\0" * 100 + gzip.compress(raw[5000:]) + b"\0" * 70000
    (tmp_path / "padded.jsonl.gz").write_bytes(padded)
    assert gzip.decompress(padded) == raw  # Python's gzip module reads it so
    assert [d.public_id for d in read(tmp_path / "padded.jsonl.gz")] == [json.loads(r)["id"] for r in recs]


def test_a_gzip_crc_error_keeps_every_record_decompressed_before_it(tmp_path):
    """zlib returns none of a call's output when the call ends in a CRC error: the whole last chunk (up to 64 KB,
    here every record) had been lost."""
    recs = _records(400)
    raw = ("\n".join(recs) + "\n").encode()
    ids = [json.loads(r)["id"] for r in recs]
    bad = bytearray(gzip.compress(raw))
    bad[-8] ^= 0xFF  # the CRC-32 in the trailer
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(bad))
    docs, dropped = split(list(read(tmp_path / "crc.jsonl.gz")))
    assert [d.public_id for d in docs] == ids  # every line was whole before the trailer
    assert [(x.reason, x.source) for x in dropped] == [("truncated_input", f"{tmp_path / 'crc.jsonl.gz'}:401")]


def test_hidden_directories_are_not_inputs(tmp_path):
    """`huggingface-cli download --local-dir` leaves .cache/huggingface/... beside the data: its files had been
    read as documents."""
    (tmp_path / "data" / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (tmp_path / "data" / ".cache" / "huggingface" / "download" / "a.jsonl.metadata").write_text("abc\n123\n")
    (tmp_path / "data" / ".hidden.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    assert iter_inputs([tmp_path / "data"]) == [tmp_path / "data" / "a.jsonl"]
    assert iter_inputs([tmp_path / "data" / ".hidden.jsonl"]) == [tmp_path / "data" / ".hidden.jsonl"]  # named


def test_a_glob_matching_nothing_is_not_found_as_a_missing_file_is(tmp_path):
    """Among other inputs it had been skipped without a word."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="no file matches"):
        iter_inputs([tmp_path / "data", str(tmp_path / "data" / "*.parquet")])


def test_text_key_names_the_text_field_and_a_missing_text_names_the_keys(tmp_path):
    """A missing text had said only `missing_text`, and a dataset naming its text otherwise could not be read."""
    lines = [{"id": "a", "raw_content": "first", "lang": "en"}, {"id": "b", "raw_content": ""},
             {"id": "c", "raw_content": " \n\t"}, {"id": "d", "text": "elsewhere"}]
    path = tmp_path / "rp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    docs, dropped = split(list(read(path, text_key="raw_content")))
    assert [(d.public_id, d.text, d.meta) for d in docs] == [("a", "first", {"lang": "en"})]
    assert [(x.id, x.reason) for x in dropped] == [("b", "empty"), ("c", "empty"), (
        "d", "missing_text:'raw_content' is not a key; available keys: ['id', 'text']")]
    assert [(x.id, x.reason) for x in read(path) if isinstance(x, Dropped)][0][1].startswith(
        "missing_text:'text' is not a key; available keys: ['id', 'lang', 'raw_content']")


def test_a_record_with_empty_text_is_dropped_at_read(tmp_path):
    """It had been kept, and sharded as BOS EOS alone."""
    records = [{"id": "e", "text": ""}, {"id": "f", "text": " \n\t"}, {"id": "g", "text": "g"}]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [(x.id.split("@")[0], getattr(x, "reason", None)) for x in read(tmp_path / "e.jsonl")] == [
        ("e", "empty"), ("f", "empty"), ("g", None)]
