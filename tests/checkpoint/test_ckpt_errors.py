"""Bad input gives one CheckpointError line that names the file or tensor and says what to do."""
from __future__ import annotations

import json
import shutil

import pytest

from herd.checkpoint import CheckpointError, convert, detect_format, load_checkpoint


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and message.strip() == message
    return message


def truncate(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_missing_path_and_unknown_directory(tmp_path):
    assert "no such file" in error_of(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "params.json" in error_of(tmp_path / "empty") and str(tmp_path / "empty") in error_of(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    assert "notes.txt" in error_of(tmp_path / "notes.txt")


def test_detect_format(make_hf, tmp_path):
    _, hf = make_hf()
    meta = convert(hf, tmp_path / "meta", "meta")
    gguf_file = convert(hf, tmp_path / "g" / "m.gguf", "gguf", gguf_type="F32")
    assert (detect_format(hf), detect_format(meta), detect_format(gguf_file), detect_format(gguf_file.parent)) == (
        "hf", "meta", "gguf", "gguf")
    shutil.copy(gguf_file, gguf_file.parent / "other.gguf")
    with pytest.raises(CheckpointError, match="several .gguf"):
        detect_format(gguf_file.parent)


def test_truncated_files(make_hf, tmp_path):
    _, hf = make_hf()
    meta = convert(hf, tmp_path / "meta", "meta")
    gguf_file = convert(hf, tmp_path / "m.gguf", "gguf", gguf_type="F32")
    truncate(hf / "model.safetensors")
    truncate(meta / "consolidated.00.pth")
    truncate(gguf_file)
    for path, name in ((hf, "model.safetensors"), (meta, "consolidated.00.pth"), (gguf_file, "m.gguf")):
        message = error_of(path)
        assert name in message and "truncated" in message, message


@pytest.mark.parametrize("key, value, tensor", [
    ("dim", 128, "tok_embeddings.weight"),
    ("vocab_size", 300, "tok_embeddings.weight"),
    ("n_layers", 3, "layers.2.attention.wq.weight"),
    ("n_kv_heads", 4, "layers.0.attention.wk.weight"),
])
def test_params_json_that_disagrees_with_the_weights(make_hf, tmp_path, key, value, tensor):
    _, hf = make_hf()
    meta = convert(hf, tmp_path / "meta", "meta")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps(params | {key: value}))
    message = error_of(meta)
    assert tensor in message and "the params.json does not match the weights" in message, message
    if key != "n_layers":
        assert "expected" in message and "shape" in message


def test_missing_shards(make_hf, tmp_path):
    _, hf = make_hf(max_shard_size="60KB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (hf / gone).unlink()
    message = error_of(hf)
    assert gone in message and "missing" in message

    meta = convert(make_hf()[1], tmp_path / "meta", "meta", shards=2)
    (meta / "consolidated.01.pth").rename(meta / "consolidated.02.pth")
    assert "consolidated.01.pth is missing" in error_of(meta)


def test_weights_listed_outside_the_checkpoint_are_refused(make_hf, tmp_path):
    """An index naming ../ or an absolute path had read whatever file it named (and herd convert copied it out)."""
    _, hf = make_hf(max_shard_size="60KB")
    index = hf / "model.safetensors.index.json"
    listed = json.loads(index.read_text())
    shard = sorted(set(listed["weight_map"].values()))[0]
    (tmp_path / "elsewhere").mkdir()
    for outside in (f"../elsewhere/{shard}", str(tmp_path / "elsewhere" / shard)):
        (tmp_path / "elsewhere" / shard).write_bytes((hf / shard).read_bytes())
        index.write_text(json.dumps({"weight_map": {k: outside if v == shard else v
                                                    for k, v in listed["weight_map"].items()}}))
        assert error_of(hf) == f"{index}: lists {outside}, outside the checkpoint's directory; download it again"


def test_a_fifo_named_like_weights_is_not_read(make_hf, tmp_path):
    """Opening it had waited for a writer for ever, past SIGTERM."""
    import os
    import subprocess
    import sys

    _, hf = make_hf()
    (hf / "model.safetensors").unlink()
    os.mkfifo(hf / "weights.safetensors")
    code = f"from herd.checkpoint import load_checkpoint\nload_checkpoint({str(hf)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "config.json but no .safetensors weights" in done.stderr


def test_config_json_that_disagrees_with_the_weights(make_hf):
    _, hf = make_hf()
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {"intermediate_size": 128}))
    message = error_of(hf)
    assert "layers.0.feed_forward.w1.weight" in message and "config.json does not match" in message
    (hf / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    assert "mistral" in error_of(hf)


def test_json_files_that_are_no_utf8_or_no_object(make_hf, tmp_path):
    _, hf = make_hf(max_shard_size="60KB")
    meta = convert(hf, tmp_path / "meta", "meta")
    for path, what in ((meta / "params.json", "it must be Meta's params.json"),
                       (hf / "config.json", "it must be a Hugging Face config.json"),
                       (hf / "model.safetensors.index.json", "download it again")):
        original = path.read_bytes()
        path.write_bytes(original.replace(b'"', b'\xc7"', 1))  # one damaged byte: no UTF-8
        message = error_of(path.parent)
        assert message.startswith(f"{path}: unreadable") and "utf-8" in message and message.endswith(what), message
        path.write_text("[]")
        assert error_of(path.parent) == f"{path}: holds a JSON list, not an object; {what}"
        path.write_bytes(original)
    index = hf / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    assert "no weight_map of tensor names to files" in error_of(hf)


@pytest.mark.parametrize("fmt, file, key, value, field", [
    ("meta", "params.json", "n_heads", 0, "n_heads must be at least 1, got 0"),  # was a ZeroDivisionError
    ("meta", "params.json", "dim", -64, "dim must be at least 1, got -64"),
    ("hf", "config.json", "num_hidden_layers", 0, "n_layers must be in [1, 10000], got 0"),
    ("hf", "config.json", "rope_theta", -1.0, "rope_theta must be above 0, got -1.0"),
])
def test_sizes_out_of_range_name_the_file_and_field(make_hf, tmp_path, fmt, file, key, value, field):
    _, hf = make_hf()
    path = convert(hf, tmp_path / "meta", "meta") if fmt == "meta" else hf
    config = json.loads((path / file).read_text())
    (path / file).write_text(json.dumps(config | {key: value}))
    message = error_of(path)
    assert file in message and field in message, message


def test_checklists_in_md5sums_formats_are_read_and_bad_lines_named(make_hf, tmp_path):
    import subprocess

    from herd.checkpoint.checksums import CHECKLIST, verify

    _, hf = make_hf()
    files = sorted(p.name for p in hf.iterdir())
    # Binary mode ("*name"), as Meta's and other download scripts may write it; the list made by coreutils.
    listing = subprocess.run(["md5sum", "-b", *files], cwd=hf, capture_output=True, text=True, check=True).stdout
    (hf / CHECKLIST).write_text(listing)
    assert verify(hf, progress=False)[0] == len(files)
    (hf / CHECKLIST).write_text(listing + "d41d8cd98f00b204e9800998ecf8427e  ../outside\n")
    with pytest.raises(CheckpointError, match=r"line \d+ is not an MD5 and a file name of this directory"):
        verify(hf, progress=False)


def _hub_digest(path) -> str:
    """What the Hub records for a file, computed by other tools: sha256sum for the weights (stored with LFS), git's
    own blob hash for small files."""
    import subprocess

    command = ["sha256sum", str(path)] if path.suffix == ".safetensors" else ["git", "hash-object", str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[0]


@pytest.mark.parametrize("layout", ["cache", "local_dir"])
def test_hugging_face_downloads_are_checked_against_the_digests_recorded(make_hf, tmp_path, layout):
    from herd.checkpoint.checksums import verify

    _, hf = make_hf()
    if layout == "cache":  # snapshots/REV/NAME -> ../../blobs/DIGEST, as huggingface_hub's cache lays files out
        snapshot, blobs = tmp_path / "repo" / "snapshots" / "abc123", tmp_path / "repo" / "blobs"
        snapshot.mkdir(parents=True)
        blobs.mkdir()
        for path in sorted(hf.iterdir()):
            blob = blobs / _hub_digest(path)
            shutil.copy(path, blob)
            (snapshot / path.name).symlink_to(f"../../blobs/{blob.name}")
        weights = blobs / _hub_digest(hf / "model.safetensors")
    else:  # hf download --local-dir: the files themselves, each one's commit and ETag kept under .cache
        snapshot = tmp_path / "local"
        shutil.copytree(hf, snapshot)
        records = snapshot / ".cache" / "huggingface" / "download"
        records.mkdir(parents=True)
        for path in sorted(hf.iterdir()):
            (records / f"{path.name}.metadata").write_text(f"abc123\n{_hub_digest(path)}\n1700000000.0\n")
        weights = snapshot / "model.safetensors"
    files, _, source = verify(snapshot, progress=False)
    assert files == len(list(hf.iterdir())) and "Hugging Face" in source
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1  # one bit of the last tensor: it would load without a word
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors differs .against the digests"):
        verify(snapshot, progress=False)
