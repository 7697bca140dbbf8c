"""Input readers: JSONL, Parquet, plain-text trees, HTML, WARC/WET, and gzip/zstd/bz2/xz around any of them.

`read(path)` yields a Document per record and a Dropped for every record it could not use, so a
malformed input costs exactly the records that are broken and is accounted for in the report.
The orchestrator shards by input file: `iter_inputs` fixes the file order, and a worker reads its unit's
records with `read` (herd.data.pipeline.read_unit); `read_file` takes a whole file at once.
"""
from __future__ import annotations

import bz2
import codecs
import email.message
import glob
import hashlib
import io
import json
import lzma
import mmap
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import zstandard

from herd.data.document import Document, Dropped
from herd.rows import parquet_rows
from herd.surrogates import holds_lone_surrogate

STAGE = "read"
_CHUNK = 1 << 16
_COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
_JSONL = {".jsonl", ".json", ".ndjson"}
_HTML = {".html", ".htm", ".xhtml"}
_WARC = {".warc", ".arc", ".wet"}  # Common Crawl's WET files are WARCs of `conversion` (plain text) records
_PARQUET = {".parquet"}
_BOM = b"\xef\xbb\xbf"
# The bytes every stream of the codec starts with: without them the file is not compressed so, not cut short.
_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00"}
_DECOMPRESSORS = {
    "gzip": lambda: zlib.decompressobj(wbits=31),
    "zstd": lambda: zstandard.ZstdDecompressor().decompressobj(),
    "bz2": bz2.BZ2Decompressor,
    "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ),
}


class Truncated(Exception):
    """The compressed stream ended before its end-of-stream marker."""


def doc_id(source: str) -> str:
    """Stable short id for a record without a given one: the same input always gets the same ids."""
    return hashlib.sha1(source.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def iter_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories and globs into a sorted, de-duplicated list of input files.

    A directory whose files are plain text is still one input per file, so workers can shard it. Hidden files and
    everything under a hidden directory are not inputs (`huggingface-cli download --local-dir` leaves `.cache/`
    metadata beside the data). A glob matching nothing is a FileNotFoundError, as a missing file is: among other
    inputs it had been skipped without a word.
    """
    found: set[Path] = set()
    for p in paths:
        matches = [Path(m) for m in glob.glob(str(p), recursive=True)] if glob.has_magic(str(p)) else [Path(p)]
        if not matches:
            raise FileNotFoundError(f"{p} (no file matches the pattern)")
        for m in matches:
            if m.is_dir():
                found.update(f for f in m.rglob("*")
                             if f.is_file() and not any(part.startswith(".") for part in f.relative_to(m).parts))
            elif m.exists():
                found.add(m)
            else:
                raise FileNotFoundError(m)
    return sorted(found)


def read_file(path: str | Path, extractor: str = "herd", text_key: str = "text") -> list[Document | Dropped]:
    """Read one input file completely; the unit of work a worker process runs."""
    return list(read(path, extractor, text_key))


def read(path: str | Path, extractor: str = "herd", text_key: str = "text") -> Iterator[Document | Dropped]:
    """Yield the documents of a file or a directory tree (sorted), with a Dropped for each unusable record.

    `extractor` turns HTML into text: "herd" (herd.data.html, keeps code and math) or "trafilatura". `text_key` names
    the field (JSONL) or column (Parquet) holding the text.
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown HTML extractor {extractor!r}; choose one of: {', '.join(EXTRACTORS)}")
    path = Path(path)
    if path.is_dir():
        for f in iter_inputs([path]):
            yield from read(f, extractor, text_key)
        return
    suffixes = [s.lower() for s in path.suffixes]
    codec = _COMPRESSED.get(suffixes[-1]) if suffixes else None
    inner = (suffixes[-2] if len(suffixes) > 1 else "") if codec else (suffixes[-1] if suffixes else "")
    source = str(path)
    if codec and not _starts_as(path, codec):
        yield Dropped(doc_id(f"{source}:not_{codec}"), STAGE, f"not_{codec}", source=source)
        return
    if inner in _PARQUET:
        yield from _read_parquet(path, source, codec, text_key)
        return
    if inner in _WARC:
        # warcio reads per-record gzip itself; a whole-file zstd, bz2 or xz stream is decompressed first.
        yield from _read_warc(path, source, codec if codec != "gzip" else None, extractor)
        return
    chunks = _decompressed_chunks(path, codec)
    if inner in _JSONL:
        yield from _read_jsonl(chunks, source, text_key)
    else:
        yield from _read_single(chunks, source, inner, extractor)


# --- bytes ---------------------------------------------------------------------------------------


def _starts_as(path: Path, codec: str) -> bool:
    """Whether the file opens with `codec`'s magic bytes; an empty file passes, as it holds no records either way."""
    with open(path, "rb") as fh:
        head = fh.read(len(_MAGIC[codec]))
    return not head or head == _MAGIC[codec]


def _decompressed_chunks(path: Path, codec: str | None) -> Iterator[bytes]:
    """The file's bytes in chunks; raises Truncated after the last readable bytes of a cut stream.

    Incremental decompression (not gzip.open) so every byte before the cut is delivered.
    """
    new = _DECOMPRESSORS[codec] if codec else None
    with open(path, "rb") as fh:
        if new is None:
            while chunk := fh.read(_CHUNK):
                yield chunk
            return
        dec, started = new(), False
        while raw := fh.read(_CHUNK):
            while raw:
                if codec == "gzip" and not started:
                    # zero bytes between or after members are padding (tape blocks), skipped as gzip.open skips them
                    raw = raw.lstrip(b"\0")
                    if not raw:
                        break
                started = True
                # a CRC error is only seen at a member's end, and zlib then returns none of that call's output
                saved = dec.copy() if codec == "gzip" else None
                try:
                    out = dec.decompress(raw)
                except (zlib.error, zstandard.ZstdError, OSError, EOFError, lzma.LZMAError) as e:
                    if saved is not None:
                        yield _until_error(saved, raw)
                    raise Truncated(f"corrupt {codec} stream: {e}") from None
                if out:
                    yield out
                if not dec.eof:
                    break
                # concatenated members/frames/streams: start over on what follows the end marker
                raw, dec, started = dec.unused_data, new(), False
        if started and not dec.eof:
            raise Truncated(f"{codec} stream ends early")


def _until_error(dec, raw: bytes) -> bytes:
    """What `dec` (zlib) gives for `raw` fed a byte at a time up to the failing byte: all the data before the bad
    trailer or block. Only run once the whole-chunk call has failed."""
    out = []
    for i in range(len(raw)):
        try:
            out.append(dec.decompress(raw[i:i + 1]))
        except zlib.error:
            break
    return b"".join(out)


def _read_all(chunks: Iterator[bytes]) -> tuple[bytes, bool]:
    """All readable bytes, and whether the stream was cut short."""
    parts: list[bytes] = []
    try:
        for chunk in chunks:
            parts.append(chunk)
    except Truncated:
        return b"".join(parts), True
    return b"".join(parts), False


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Complete lines; a trailing partial line is only yielded if the stream ended cleanly. Each chunk is split
    alone and a long line's pieces joined once (splitting the growing line at every chunk had taken 11 s for one
    line of 50 MB)."""
    pending: list[bytes] = []
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        if complete:
            yield b"".join([*pending, complete[0]])
            yield from complete[1:]
            pending = []
        if rest:
            pending.append(rest)
    if pending:
        yield b"".join(pending)


# --- formats -------------------------------------------------------------------------------------


def _read_jsonl(chunks: Iterator[bytes], source: str, text_key: str = "text") -> Iterator[Document | Dropped]:
    """One document per line; `source` (and so a drop record) names the file and the 1-based line."""
    n = 0
    try:
        for n, raw in enumerate(_lines(chunks), start=1):
            src = f"{source}:{n}"
            # a byte-order mark opens files written by some Windows tools, and `cat` carries it mid-file
            raw = raw.removeprefix(_BOM)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Dropped(doc_id(src), STAGE, "invalid_utf8", source=src)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield Dropped(doc_id(src), STAGE, "invalid_json", source=src)
                continue
            except RecursionError:  # nested deeper than Python's parser goes: it had ended the file's reading there
                yield Dropped(doc_id(src), STAGE, "nested_too_deep", source=src)
                continue
            if not isinstance(rec, dict):
                yield Dropped(doc_id(src), STAGE, "not_an_object", source=src)
                continue
            if holds_lone_surrogate(raw, rec):
                yield Dropped(doc_id(src), STAGE, "unpaired_surrogate", source=src)
                continue
            yield _record(rec, src, text_key)
    except Truncated:
        src = f"{source}:{n + 1}"  # the line the stream was cut in
        yield Dropped(doc_id(f"{src}:truncated"), STAGE, "truncated_input", source=src)


def _record(rec: dict, src: str, text_key: str = "text") -> Document | Dropped:
    """A JSON line's or a table row's fields as a document: `text_key`, `id` and `url`, the other fields its
    metadata. A record without text says which keys it has, so a dataset naming its text otherwise (`content`,
    `raw_content`) shows what to give as `text_key`."""
    name = str(rec["id"]) if rec.get("id") is not None else None
    rid = doc_id(src) if name is None else name
    url = rec.get("url") if isinstance(rec.get("url"), str) else None
    text = rec.get(text_key)
    if text is None:
        said = "is null" if text_key in rec else f"is not a key; available keys: {sorted(rec)}"
        return Dropped(rid, STAGE, f"missing_text:{text_key!r} {said}", url, src)
    if not isinstance(text, str):
        return Dropped(rid, STAGE, "text_not_a_string", url, src)
    if not text.strip():  # would be sharded as BOS EOS alone
        return Dropped(rid, STAGE, "empty", url, src)
    meta = {k: v for k, v in rec.items() if k not in ("id", text_key, "url")}
    # The record's own id may repeat in another input (or this one): its place makes it unique.
    return Document(doc_id(src) if name is None else f"{name}@{src}", text, src, url, meta=meta, name=name)


def _read_parquet(path: Path, source: str, codec: str | None, text_key: str = "text") -> Iterator[Document | Dropped]:
    """One document per row, its columns read as a JSON line's fields, a batch of rows at a time; `source` names the
    file and the 1-based row. Hugging Face datasets (FineWeb, Dolma, RedPajama) ship as Parquet."""
    import pyarrow as pa

    if codec:  # Parquet compresses inside; an outer codec must be undone before its footer can be read
        blob, truncated = _read_all(_decompressed_chunks(path, codec))
        if truncated:
            yield Dropped(doc_id(f"{source}:truncated"), STAGE, "truncated_input", source=source)
            return
        file = pa.BufferReader(blob)
        head = blob[:4]
    else:
        file = path
        with open(path, "rb") as fh:
            head = fh.read(4)
    if not head:
        return
    if head != b"PAR1":
        yield Dropped(doc_id(f"{source}:not_parquet"), STAGE, "not_parquet", source=source)
        return
    n = 0
    try:
        for n, row in enumerate(parquet_rows(file), start=1):
            record = _record(row, f"{source}:{n}", text_key)
            if isinstance(record, Document):
                # timestamps and decimals as text, so the metadata can be written out as JSON
                record.meta = json.loads(json.dumps(record.meta, default=str))
            yield record
    except (pa.ArrowException, OSError):
        src = f"{source}:{n + 1}"
        yield Dropped(doc_id(f"{src}:truncated"), STAGE, "truncated_input", source=src)


def _read_single(chunks: Iterator[bytes], source: str, suffix: str, extractor: str) -> Iterator[Document | Dropped]:
    """Plain text or HTML: the whole file is one document."""
    did = doc_id(source)
    data, truncated = _read_all(chunks)
    data = _as_utf8(data.removeprefix(_BOM))
    reason = None
    if truncated:  # one document cut mid-way is not a document; its readable part is not kept
        reason = "truncated_input"
    elif not data.strip():
        reason = "empty"
    elif b"\0" in data[:8192]:  # text never holds NUL bytes; index files, images and archives do
        reason = "binary"
    elif suffix in _HTML or (suffix not in (".txt", ".text", ".md") and _looks_like_html(data)):
        doc = html_document(data, did, source, extractor=extractor)
    else:
        doc = _text_document(data, did, source)
    if reason is None and doc is None:
        reason = "no_text"
    yield Dropped(did, STAGE, reason, source=source) if reason else doc


def _as_utf8(data: bytes) -> bytes:
    """UTF-16 text (a byte-order mark first, as Windows tools write it) as UTF-8; other bytes as they are."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16").encode()
        except UnicodeError:  # no text after all, or the file ends mid-character: let the checks below say which
            pass
    return data


def _decode(data: bytes) -> tuple[str, int]:
    """Decode UTF-8 with replacement, counting the replaced bytes for the report."""
    text = data.decode("utf-8", errors="replace")
    errors = text.count("\ufffd") - data.count("\ufffd".encode())
    return text, errors


def _text_document(data: bytes, did: str, source: str, url: str | None = None) -> Document | None:
    text, errors = _decode(data)
    if not text.strip():
        return None
    return Document(did, text, source, url, meta={"utf8_errors": errors} if errors else {})


_HTML_START = re.compile(rb"^\s*(<!doctype html|<html|<head|<body|<\?xml[^>]*>\s*<html)", re.I)


def _looks_like_html(data: bytes) -> bool:
    return bool(_HTML_START.match(data[:1024]))


def _trafilatura(html: str, url: str | None) -> str | None:
    import trafilatura

    return trafilatura.extract(html, url=url, include_comments=False)


def _herd(tree, url: str | None) -> str | None:
    from herd.data.html import extract

    return extract(tree)


EXTRACTORS = {"herd": _herd, "trafilatura": _trafilatura}


# Labels whose pages browsers decode with the superset (WHATWG Encoding): such pages use its extra characters.
_SUPERSETS = {"iso8859-1": "cp1252", "ascii": "cp1252", "gb2312": "gbk", "shift_jis": "cp932", "euc_kr": "cp949"}


def _charset(content_type: str | None) -> str | None:
    """The charset parameter of a Content-Type value."""
    if not content_type:
        return None
    header = email.message.Message()
    header["content-type"] = content_type
    return header.get_content_charset()


def _meta_charset(data: bytes) -> str | None:
    """The charset a page's <meta charset> or <meta http-equiv="Content-Type"> declares (browsers look in its head)."""
    from herd.data.html import parse

    tree = parse(data[:16384].decode("latin-1"))  # byte for byte, so the ASCII of the declaration reads as it is
    if tree is None:
        return None
    declared = [c.strip() for c in tree.xpath("//meta/@charset") if c.strip()]
    declared += [_charset(c) for c in tree.xpath('//meta[translate(@http-equiv, "CONTENT-YP", "content-yp")'
                                                  '="content-type"]/@content')]
    return next((c for c in declared if c), None)


def _decode_page(data: bytes, http_charset: str | None = None) -> tuple[str, int]:
    """A page's text and the bytes replaced in it: strict UTF-8 (what most pages are, whatever they declare), then
    the HTTP header's charset, the page's <meta> one, detection, and UTF-8 with replacement when nothing fits."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    for label, declared_in_page in ((http_charset, False), (_meta_charset(data), True)):
        if not label:
            continue
        try:
            name = codecs.lookup(label).name
        except LookupError:  # a name no codec has
            continue
        if declared_in_page and name.startswith("utf-16"):
            # A page that could say so in ASCII is no UTF-16 (WHATWG reads the label as UTF-8, which has failed
            # here): decoded as UTF-16, a windows-1252 page had become CJK garbage.
            continue
        try:
            return data.decode(_SUPERSETS.get(name, name)), 0
        except (UnicodeDecodeError, LookupError):  # mislabelled, or a codec not from bytes to text (base64)
            continue
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return _decode(data)
    best = from_bytes(data).best()
    return (str(best), 0) if best is not None else _decode(data)


def html_document(data: bytes, did: str, source: str, url: str | None = None,
                  extractor: str = "herd", http_charset: str | None = None) -> Document | None:
    """Main text of an HTML page, with its canonical URL when the page names one; `http_charset`: the charset of the
    Content-Type header it was served with."""
    from herd.data.html import parse

    html, errors = _decode_page(data.removeprefix(_BOM), http_charset)
    tree = parse(html)  # decoded first, so a <meta charset> naming another encoding cannot garble it
    if tree is None:  # lxml rejects some broken pages outright; they have no usable text
        return None
    url = url or _page_url(tree)
    # trafilatura parses the page again itself, into the element classes it expects
    text = EXTRACTORS[extractor](html if extractor == "trafilatura" else tree, url)
    if not text or not text.strip():
        return None
    return Document(did, text, source, url, meta={"utf8_errors": errors} if errors else {})


def _page_url(tree) -> str | None:
    for xpath in ('//link[@rel="canonical"]/@href', '//meta[@property="og:url"]/@content'):
        hits = [h.strip() for h in tree.xpath(xpath) if h.strip()]
        if hits:
            return hits[0]
    return None


def _read_warc(path: Path, source: str, codec: str | None, extractor: str) -> Iterator[Document | Dropped]:
    """HTML responses and text conversions (WET) of a WARC; a broken record becomes a Dropped and reading resumes at
    the next one.

    Records are named "FILE@OFFSET", the byte offset of the record in the file (decompressed, for `codec`: a
    whole-file zstd, bz2 or xz stream).
    """
    # Plain or per-record gzip, which warcio reads itself: the file is mapped, where it had been read whole into each
    # worker's memory (a Common Crawl WARC is about 1 GB).
    if codec is None:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                yield from _warc_records(blob, source, extractor)
        return
    blob, truncated = _read_all(_decompressed_chunks(path, codec))
    yield from _warc_records(blob, source, extractor)
    if truncated:
        yield Dropped(doc_id(f"{source}:truncated"), STAGE, "truncated_input", source=f"{source}@{len(blob)}")


_WARC_START = re.compile(rb"WARC/1\.[01]\r?\n")
_GZIP_START = re.compile(rb"\x1f\x8b\x08")


def _warc_records(blob: bytes | mmap.mmap, source: str, extractor: str) -> Iterator[Document | Dropped]:
    from warcio.archiveiterator import ArchiveIterator

    # After a corrupt record warcio cannot go on, so restart it at the next record boundary.
    boundary = _GZIP_START if blob[:2] == b"\x1f\x8b" else _WARC_START
    pos, index = 0, 0
    while pos < len(blob):
        stream = blob if isinstance(blob, mmap.mmap) else io.BytesIO(blob)  # each a file object over the bytes
        stream.seek(pos)
        records = ArchiveIterator(stream, check_digests=False)
        try:
            for record in records:
                # records.offset: where this record starts in the file (warcio's stream position)
                yield from _warc_record(record, doc_id(f"{source}#{index}"), f"{source}@{records.offset}", extractor)
                index += 1
            return
        except Exception:  # warcio raises several types for a corrupt record; all mean "skip it"
            yield Dropped(doc_id(f"{source}#{index}"), STAGE, "bad_warc_record", source=f"{source}@{records.offset}")
            index += 1
            nxt = boundary.search(blob, records.offset + 1)
            if nxt is None:
                return
            pos = nxt.start()


def _warc_record(record, did: str, source: str, extractor: str) -> Iterator[Document | Dropped]:
    if record.rec_type not in ("response", "conversion"):
        return
    url = record.rec_headers.get_header("WARC-Target-URI")
    ctype = (record.http_headers.get_header("Content-Type") if record.http_headers else None) or ""
    body = record.content_stream().read()
    if record.raw_stream.limit > 0:  # fewer bytes than Content-Length: the file was cut inside it
        yield Dropped(did, STAGE, "truncated_warc_record", url, source)
        return
    if record.rec_type == "conversion":  # text already extracted from a page (Common Crawl writes it as UTF-8)
        yield _text_document(body, did, source, url) or Dropped(did, STAGE, "empty", url, source)
        return
    if "html" not in ctype.lower():
        return
    doc = html_document(body, did, source, url, extractor, _charset(ctype)) if body.strip() else None
    yield doc if doc is not None else Dropped(did, STAGE, "no_text", url, source)
