"""Token shards: documents survive the round trip whole, shards split only between documents, checksums bite."""
import hashlib
import json

import numpy as np
import pytest

from herd.data.config import ShardConfig
from herd.data.shards import ByteTokenizer, ChecksumError, ShardWriter, TokenShards, encode_document

TEXTS = ["Debian is a free operating system.", "", "ünïcödé and emoji 🐧 survive", "x" * 50, "last one"]


def write(tmp_path, texts, **config):
    config = ShardConfig(tokenizer="herd.data.shards:ByteTokenizer", **config)
    tok = ByteTokenizer()
    writer = ShardWriter(tmp_path, config, tok)
    for i, text in enumerate(texts):
        writer.add(f"doc{i}", encode_document(tok, text, config))
    return writer.close()


def test_round_trip_keeps_every_document_and_its_boundaries(tmp_path):
    manifest = write(tmp_path, TEXTS)
    shards = TokenShards(tmp_path, verify=True)
    tok = ByteTokenizer()
    assert len(shards) == len(TEXTS) == manifest["documents"]
    for i, (tokens, text) in enumerate(zip(shards, TEXTS)):
        assert tokens.dtype == np.uint32
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id  # boundaries are in the data itself
        assert tok.decode(tokens) == text
        assert shards.doc_id(i) == f"doc{i}"
    assert tok.decode(shards[-1]) == TEXTS[-1] and tok.decode(shards[2]) == TEXTS[2]
    assert shards.num_tokens == sum(len(t.encode()) + 2 for t in TEXTS)
    assert shards.tokenizer["bos_id"] == 256 and shards.tokenizer["vocab_size"] == 258


def test_shards_split_between_documents_never_inside_one(tmp_path):
    manifest = write(tmp_path, TEXTS, max_tokens_per_shard=60)
    assert len(manifest["shards"]) > 1
    assert all(s["tokens"] <= 60 or s["documents"] == 1 for s in manifest["shards"])
    shards = TokenShards(tmp_path)
    assert [ByteTokenizer().decode(t) for t in shards] == TEXTS
    with pytest.raises(IndexError):
        shards[len(TEXTS)]


def test_raw_files_are_uint32_with_uint64_offsets(tmp_path):
    manifest = write(tmp_path, TEXTS[:1])
    name = manifest["shards"][0]["name"]
    tokens = np.fromfile(tmp_path / f"{name}.bin", dtype="<u4")
    index = np.fromfile(tmp_path / f"{name}.idx", dtype="<u8")
    assert list(index) == [0, len(tokens)] and len(tokens) == len(TEXTS[0]) + 2


def test_verify_names_a_corrupted_file(tmp_path):
    manifest = write(tmp_path, TEXTS)
    path = tmp_path / f"{manifest['shards'][0]['name']}.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    TokenShards(tmp_path)  # reading does not hash by default: that is the trainer's choice
    with pytest.raises(ChecksumError, match=path.name):
        TokenShards(tmp_path, verify=True)


def test_not_a_shard_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TokenShards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="unsupported"):
        TokenShards(tmp_path)


def test_the_llama3_tokenizer_round_trips(tmp_path):
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer()
    config = ShardConfig()
    writer = ShardWriter(tmp_path, config, tok)
    for i, text in enumerate(TEXTS):
        writer.add(str(i), encode_document(tok, text, config))
    writer.close()
    shards = TokenShards(tmp_path, verify=True)
    assert shards.tokenizer["vocab_size"] == tok.vocab_size
    for tokens, text in zip(shards, TEXTS):
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        assert tok.decode(tokens[1:-1].tolist()) == text


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-5])


@pytest.mark.parametrize("file, damage, words", [
    ("shard-00000.bin", _truncate, "shard-00000.bin holds 539 bytes where the manifest makes 544 (truncated"),
    ("shard-00000.idx", lambda p: p.write_bytes(b""), "shard-00000.idx holds 0 bytes where the manifest makes 48"),
    ("shard-00000.idx", lambda p: p.write_bytes(np.arange(6, dtype="<u8")[::-1].tobytes()),
     "shard-00000.idx: its offsets do not run from 0 up to the shard's 136 tokens"),
    ("shard-00000.ids", _truncate, "shard-00000.ids holds 4 document ids for the manifest's 5"),
    ("shard-00000.bin", lambda p: p.unlink(), "shard-00000.bin is missing"),
    ("manifest.json", _truncate, "manifest.json: not JSON (Expecting"),
    ("manifest.json", lambda p: p.write_text(json.dumps({"format": "herd-token-shards/1"})),
     "manifest.json: not a complete manifest"),
    # written and never read: int64 tokens trained as uint32 pairs (each token, then a 0)
    ("manifest.json", lambda p: p.write_text(p.read_text().replace('"uint32"', '"int64"')),
     "manifest.json: tokens stored as 'int64', where herd's shards hold uint32"),
])
def test_a_damaged_shard_is_named_when_the_shards_are_opened(tmp_path, file, damage, words):
    """Reading had found no tokens (a truncated .bin), raised an IndexError (an empty .idx) or a bare JSON error."""
    write(tmp_path, TEXTS)
    damage(tmp_path / file)
    with pytest.raises(ValueError) as e:
        TokenShards(tmp_path)
    assert str(e.value).startswith(str(tmp_path / words.split()[0].rstrip(":"))), str(e.value)
    assert words in str(e.value) and "run the `herd data run` that wrote the shards again" in str(e.value)


def test_any_document_id_round_trips(tmp_path):
    """An id holding a newline had been written as two lines, so herd refused its own shards."""
    ids = ["doc\n1", "7", "a\\nb", "ends with \\", "\\\\\n\n", "cr\r and\u2028separators", ""]
    config = ShardConfig(tokenizer="herd.data.shards:ByteTokenizer")
    writer = ShardWriter(tmp_path, config, ByteTokenizer())
    for doc_id in ids:
        writer.add(doc_id, encode_document(ByteTokenizer(), "text", config))
    writer.close()
    shards = TokenShards(tmp_path, verify=True)
    assert [shards.doc_id(i) for i in range(len(shards))] == ids


def test_shards_of_the_first_format_read_their_ids_as_written(tmp_path):
    """Format /1 wrote ids unescaped: a backslash in one is itself, not the start of an escape."""
    manifest = write(tmp_path, TEXTS[:2])
    ids = tmp_path / f"{manifest['shards'][0]['name']}.ids"
    ids.write_bytes(b"C:\\new\\dir\nback\\\\slashes\n")
    manifest.update(format="herd-token-shards/1")
    manifest["shards"][0]["sha256_ids"] = hashlib.sha256(ids.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shards = TokenShards(tmp_path, verify=True)
    assert [shards.doc_id(0), shards.doc_id(1)] == ["C:\\new\\dir", "back\\\\slashes"]


class NoBOSTokenizer(ByteTokenizer):
    """Has a BOS id, as SmolLM2's tokenizer does, and never writes it."""

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return super().encode(text, bos=False, eos=eos)


@pytest.mark.parametrize("tokenizer, bos", [(ByteTokenizer(), True), (NoBOSTokenizer(), False)])
def test_the_manifest_says_whether_documents_begin_with_bos(tmp_path, tokenizer, bos):
    """The manifest had said "bos": true from the config for SmolLM2's tokenizer, whose documents hold no BOS."""
    config = ShardConfig(tokenizer="herd.data.shards:ByteTokenizer")
    writer = ShardWriter(tmp_path, config, tokenizer)
    writer.add("a", encode_document(tokenizer, "Hello world.", config))
    writer.close()
    shards = TokenShards(tmp_path)
    assert shards.tokenizer["bos"] is bos and bool(shards[0][0] == tokenizer.bos_id) is bos
    assert shards.tokenizer["eos"] is True and shards[0][-1] == tokenizer.eos_id
