"""Meta ↔ HF conversions lose nothing: every tensor comes back bit for bit, shards split and merge correctly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from herd.checkpoint import CheckpointError, build_model, convert, load_checkpoint, save_checkpoint
from herd.checkpoint.hf import to_hf_rows, to_meta_rows


def read_hf_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def mapped_ranges(path):
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                yield int(lo, 16), int(hi, 16)


def test_permutation_is_inverted_exactly():
    w = torch.randn(8 * 16, 24)
    assert torch.equal(to_meta_rows(to_hf_rows(w, 8), 8), w)
    assert not torch.equal(to_hf_rows(w, 8), w)
    # Meta's pair (2i, 2i+1) of a head lands at rows (i, i + head_dim/2) in HF's half-split order.
    head = torch.arange(16.0).unsqueeze(1)
    assert to_hf_rows(head, 1).flatten().tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_to_meta_to_hf_is_bit_exact(make_hf, tmp_path, tied):
    # bf16 and several safetensors shards, as published checkpoints come.
    _, source = make_hf(tied=tied, dtype=torch.bfloat16, max_shard_size="60KB")
    assert (source / "model.safetensors.index.json").is_file()
    meta = convert(source, tmp_path / "meta", "meta", shards=2)
    shard = torch.load(meta / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    back = convert(meta, tmp_path / "back", "hf", max_shard_bytes=50_000)
    assert (back / "model.safetensors.index.json").is_file() and len(list(back.glob("*.safetensors"))) > 1
    # readable as the umask allows, like any file and directory made beside them
    assert {f.stat().st_mode for f in back.iterdir()} == {(back / "config.json").stat().st_mode}
    (tmp_path / "made-by-mkdir").mkdir()
    assert back.stat().st_mode == meta.stat().st_mode == (tmp_path / "made-by-mkdir").stat().st_mode

    original, result = read_hf_tensors(source), read_hf_tensors(back)
    assert set(result) == set(original)
    for name, tensor in original.items():
        assert result[name].dtype == tensor.dtype and torch.equal(result[name], tensor), name
    cfg_in, cfg_out = (json.loads((d / "config.json").read_text()) for d in (source, back))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert cfg_out[key] == cfg_in[key], key
    assert cfg_out["rope_scaling"] == {k: v for k, v in cfg_in["rope_parameters"].items() if k != "rope_theta"}


def test_meta_shards_are_a_real_model_parallel_split(make_hf, tmp_path):
    _, source = make_hf()
    ckpt = load_checkpoint(source)
    meta = save_checkpoint(ckpt, tmp_path / "meta", "meta", shards=2)
    s0, s1 = (torch.load(meta / f"consolidated.0{i}.pth", weights_only=True) for i in range(2))
    full = {name: ckpt.state_dict[name] for name in ckpt.state_dict}
    # Column-parallel: output rows split; row-parallel: input columns split; norms replicated.
    for name, dim in [("layers.0.attention.wq.weight", 0), ("layers.1.attention.wk.weight", 0),
                      ("layers.0.feed_forward.w1.weight", 0), ("output.weight", 0), ("tok_embeddings.weight", 0),
                      ("layers.0.attention.wo.weight", 1), ("layers.1.feed_forward.w2.weight", 1)]:
        assert s0[name].shape[dim] * 2 == full[name].shape[dim]
        assert torch.equal(torch.cat([s0[name], s1[name]], dim=dim), full[name]), name
    assert torch.equal(s0["norm.weight"], s1["norm.weight"])
    merged = load_checkpoint(meta)
    assert merged.meta["shards"] == 2
    for name, tensor in full.items():
        assert torch.equal(merged.state_dict[name], tensor), name


def test_more_shards_than_kv_heads_replicate_each_head_as_meta_does(make_hf, tmp_path):
    """Llama 3.1 405B comes in 16 shards over 8 key-value heads, each head in two of them: herd had refused to
    write such a split and, reading one, concatenated the copies and blamed the params.json."""
    _, source = make_hf()  # 2 kv heads
    ckpt = load_checkpoint(source)
    meta = save_checkpoint(ckpt, tmp_path / "meta", "meta", shards=4)
    wk = ckpt.state_dict["layers.0.attention.wk.weight"]
    head = wk.shape[0] // ckpt.config.kv_heads
    shards = [torch.load(meta / f"consolidated.0{i}.pth", weights_only=True) for i in range(4)]
    for rank, shard in enumerate(shards):
        assert torch.equal(shard["layers.0.attention.wk.weight"], wk[rank // 2 * head:(rank // 2 + 1) * head])
    merged = load_checkpoint(meta)
    for name in ckpt.state_dict:
        assert torch.equal(merged.state_dict[name], ckpt.state_dict[name]), name
    with pytest.raises(CheckpointError, match="cannot split kv heads 2 into 3 model-parallel shards"):
        save_checkpoint(ckpt, tmp_path / "meta3", "meta", shards=3)


def test_more_shards_than_kv_heads_count_each_copy_as_meta_does(make_hf, tmp_path):
    """Meta's 405B mp16 says n_kv_heads 16 over 8 real heads: its reference gives every rank n_kv_heads //
    world_size heads. herd wrote the real count (Meta's model then built 2 // 4 = 0 heads per rank) and, reading
    Meta's, kept the copies as heads of their own (a Hugging Face export with twice the key-value cache)."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.sku_list import resolve_model

    mp16 = resolve_model("Llama3.1-405B:bf16-mp16")
    assert (mp16.arch_args["n_kv_heads"], mp16.pth_file_count) == (16, 16)  # over 8 heads
    _, source = make_hf()  # 2 kv heads
    ckpt = load_checkpoint(source)
    meta = save_checkpoint(ckpt, tmp_path / "meta", "meta", shards=4)
    params = json.loads((meta / "params.json").read_text())
    args = ModelArgs(max_seq_len=64, max_batch_size=1, **params)
    shard = torch.load(meta / "consolidated.03.pth", weights_only=True)
    head_dim = args.dim // args.n_heads
    assert shard["layers.0.attention.wk.weight"].shape[0] == args.n_kv_heads // 4 * head_dim
    merged = load_checkpoint(meta)
    assert merged.config.kv_heads == 2
    for name in ckpt.state_dict:
        assert torch.equal(merged.state_dict[name], ckpt.state_dict[name]), name
    hf = convert(meta, tmp_path / "hf", "hf")
    assert json.loads((hf / "config.json").read_text())["num_key_value_heads"] == 2


def test_query_heads_that_do_not_divide_into_the_shards_are_refused(make_hf, tmp_path):
    _, source = make_hf()  # 4 query heads
    with pytest.raises(CheckpointError, match="cannot split query heads 4 into 8 model-parallel shards"):
        save_checkpoint(load_checkpoint(source), tmp_path / "meta", "meta", shards=8)


def test_params_json_is_one_meta_s_reference_reads(make_hf, tmp_path):
    # Meta's Llama.build passes max_seq_len beside the file's keys: a params.json holding it failed as given twice.
    from llama_models.llama3.args import ModelArgs

    _, source = make_hf()
    ckpt = load_checkpoint(source)
    for config in (ckpt.config, ckpt.config.replace(max_seq_len=4096)):
        meta = save_checkpoint((config, ckpt.state_dict), tmp_path / f"meta{config.max_seq_len}", "meta")
        params = json.loads((meta / "params.json").read_text())
        args = ModelArgs(max_seq_len=512, max_batch_size=1, **params)
        assert (args.dim, args.n_kv_heads, args.max_seq_len) == (config.dim, config.kv_heads, 512)
        assert load_checkpoint(meta).config.max_seq_len == config.max_seq_len


def test_params_json(make_hf, tmp_path):
    from ckpt_helpers import LLAMA3_ROPE

    _, source = make_hf(rope=LLAMA3_ROPE)
    meta = convert(source, tmp_path / "meta8", "meta")
    params = json.loads((meta / "params.json").read_text())
    # Factor 8 is what Meta's reference code assumes: no extra key needed.
    assert params["use_scaled_rope"] is True and "rope_scaling" not in params
    ckpt = load_checkpoint(meta)
    assert ckpt.config.hidden_dim == 96 and ckpt.config.n_kv_heads == 2

    _, source = make_hf(rope=LLAMA3_ROPE | {"factor": 32.0})
    params = json.loads((convert(source, tmp_path / "meta32", "meta") / "params.json").read_text())
    assert params["rope_scaling"]["factor"] == 32.0


def test_llama_3_2_params_as_meta_ships_them_take_the_release_factor_32():
    """Meta's params.json for Llama 3.2 1B/3B says only use_scaled_rope; its reference code assumes factor 8, which
    Meta says is wrong for them (their HF config.json has 32): the Meta download had computed otherwise past 8K."""
    from llama_models.sku_list import arch_args_1b, arch_args_3b

    from herd.checkpoint.meta import config_from_params
    from herd.model.config import CONFIGS

    for name, args in (("llama3.2-1b", arch_args_1b()), ("llama3.2-3b", arch_args_3b())):
        assert config_from_params(dict(args), "params.json").rope_scaling == CONFIGS[name].rope_scaling
    llama31 = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
               "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-5, "rope_theta": 500000.0,
               "use_scaled_rope": True}
    assert config_from_params(llama31, "params.json").rope_scaling.factor == 8.0


def test_a_rope_factor_other_than_the_shapes_release_is_written_out():
    """A Llama 3.2 1B shape with factor 8 had been written without its scaling (8 being the default) and read back
    as the release's 32."""
    from herd.checkpoint.meta import config_from_params, params_from_config
    from herd.model.config import CONFIGS, RopeScaling

    config = CONFIGS["llama3.2-1b"]
    for factor in (8.0, 32.0, 16.0):
        changed = config.replace(rope_scaling=RopeScaling(factor=factor))
        assert config_from_params(params_from_config(changed), "params.json").rope_scaling.factor == factor
    assert "rope_scaling" not in params_from_config(config)  # the release's own: as Meta ships it


def test_tied_meta_checkpoint_stores_output_and_loads_tied(make_hf, tmp_path):
    _, source = make_hf(tied=True)
    meta = convert(source, tmp_path / "meta", "meta")
    stored = torch.load(meta / "consolidated.00.pth", weights_only=True)
    assert torch.equal(stored["output.weight"], stored["tok_embeddings.weight"])  # Meta's model needs it
    ckpt = load_checkpoint(meta)
    assert ckpt.config.tie_embeddings and "output.weight" not in ckpt.state_dict
    model = build_model(ckpt)
    assert model.output.weight is model.tok_embeddings.weight


def test_build_model_adopts_mapped_tensors_without_copying(make_hf, tmp_path):
    _, source = make_hf(dtype=torch.bfloat16)
    meta = convert(source, tmp_path / "meta", "meta")
    ckpt = load_checkpoint(meta, dtype=None)
    model = build_model(ckpt)
    wq = model.layers[0].attention.wq.weight
    assert wq.dtype == torch.bfloat16
    # assign=True kept the loaded tensor itself, and that tensor lies in the file's memory mapping.
    assert wq.data_ptr() == ckpt.state_dict["layers.0.attention.wq.weight"].data_ptr()
    assert any(lo <= wq.data_ptr() < hi for lo, hi in mapped_ranges(meta / "consolidated.00.pth"))
    assert not any(p.is_meta for p in model.parameters()) and not model.rope_freqs.is_meta


def test_save_is_atomic_and_replaces(make_hf, tmp_path, monkeypatch):
    _, source = make_hf()
    out = tmp_path / "out"
    convert(source, out, "hf")
    first = (out / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("herd.checkpoint.meta.torch.save", fail)
    with pytest.raises(OSError, match="disk full"):  # a write that fails half-way leaves the old checkpoint
        convert(source, out, "meta")
    assert (out / "model.safetensors").read_bytes() == first and not (out / "params.json").exists()
    monkeypatch.undo()
    convert(source, out, "meta")  # replacing an existing checkpoint leaves only the new one
    assert (out / "params.json").is_file() and not (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_membership_and_shapes_read_no_tensor():
    from herd.checkpoint import LazyStateDict
    from herd.checkpoint.base import LazyTensor

    reads = []
    state = LazyStateDict({"w": LazyTensor((2, 3), lambda: reads.append("w") or torch.zeros(2, 3))})
    assert "w" in state and "x" not in state and state.shape("w") == (2, 3)
    assert reads == []
    assert state["w"].shape == (2, 3) and reads == ["w"]
    del state["w"]
    assert "w" not in state and reads == ["w"]


def no_work(monkeypatch):
    """Make every writer fail the test: a refusal must come before any tensor is written."""
    for writer in ("herd.checkpoint.hf.save_hf", "herd.checkpoint.meta.save_meta", "herd.checkpoint.gguf.save_gguf"):
        monkeypatch.setattr(writer, lambda *args, **kwargs: pytest.fail("the work began before the refusal"))


def test_an_output_holding_other_files_or_the_source_is_refused_and_kept(make_hf, tmp_path, monkeypatch):
    from herd.checkpoint import CheckpointError

    _, source = make_hf()
    src = convert(source, tmp_path / "outer" / "src", "meta")
    files = {path.name: path.read_bytes() for path in src.iterdir()}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    (tmp_path / "only-config").mkdir()
    (tmp_path / "only-config" / "config.json").write_text("{}")  # an app's config, not a checkpoint
    (tmp_path / "notes.txt").write_text("keep")
    no_work(monkeypatch)
    for fmt in ("hf", "meta"):
        with pytest.raises(CheckpointError, match=f"^{mine}: exists and holds important.txt, which is no checkpoint"):
            convert(source, mine, fmt)
    with pytest.raises(CheckpointError, match="only-config: exists and holds no checkpoint .* give a path that"):
        convert(source, tmp_path / "only-config", "hf")
    with pytest.raises(CheckpointError, match="notes.txt: exists and is no GGUF file"):
        convert(source, tmp_path / "notes.txt", "gguf")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'outer'}: is or holds the checkpoint being read"):
        convert(src, tmp_path / "outer", "meta")
    with pytest.raises(CheckpointError, match="src/x: lies inside the checkpoint being read"):
        convert(src, src / "x", "hf")
    with pytest.raises(CheckpointError, match="is or holds the checkpoint being read"):
        convert(src, src, "hf")
    assert (mine / "important.txt").read_text() == (tmp_path / "notes.txt").read_text() == "keep"
    assert {path.name: path.read_bytes() for path in src.iterdir()} == files
    monkeypatch.undo()
    assert convert(source, src, "hf") == src  # a checkpoint that is not the one read is replaced


def test_meta_shards_below_one_are_refused_by_name(make_hf, tmp_path):
    from herd.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="^shards must be at least 1 .*, not 0$"):
        convert(make_hf()[1], tmp_path / "meta", "meta", shards=0)
    assert list(tmp_path.glob("*meta*")) == list(tmp_path.glob(".*")) == []


def test_unwritable_outputs_are_named_with_the_remedy_before_any_work(make_hf, tmp_path, monkeypatch):
    _, source = make_hf()
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir").mkdir()
    no_work(monkeypatch)
    for out, fmt, error in (("/proc/x", "hf", "No such file or directory; give OUT a directory"),
                            (tmp_path / "a-file" / "m", "meta", "Not a directory; give OUT a directory"),
                            (tmp_path / "a-file", "hf", "Not a directory; give OUT a directory"),
                            (tmp_path / "a-dir", "gguf", "Is a directory; give OUT a file")):
        with pytest.raises(OSError) as raised:
            convert(source, out, fmt)
        assert str(raised.value) == f"cannot write {out}: {error} you can write to"
    monkeypatch.undo()
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert convert(source, ".", "hf") == here  # a real name, which the rename needs ("." has none)
    assert (here / "model.safetensors").is_file()


def test_interrupted_saves_and_killed_ones_leave_nothing_behind(make_hf, tmp_path, monkeypatch):
    import os
    import subprocess

    _, source = make_hf()
    gone = subprocess.Popen(["true"])
    gone.wait()
    for leftover in (".out.tmp", ".out.old", ".m.gguf.tmp"):  # what a run killed by SIGKILL leaves
        (tmp_path / f"{leftover}-{gone.pid}").mkdir()
        (tmp_path / f"{leftover}-{gone.pid}" / "model.safetensors").write_bytes(b"half")
    running = tmp_path / f".out.tmp-{os.getppid()}"  # another run's, under way
    running.mkdir()
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as SIGINT, and SIGTERM through herd's handler (SystemExit), unwind

    def ended(*args, **kwargs):
        raise SystemExit(143)

    monkeypatch.setattr("herd.checkpoint.hf.save_hf", interrupted)
    monkeypatch.setattr("herd.checkpoint.gguf.save_gguf", ended)
    with pytest.raises(KeyboardInterrupt):
        convert(source, tmp_path / "out", "hf")
    with pytest.raises(SystemExit):
        convert(source, tmp_path / "m.gguf", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [running.name]
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.gguf").exists()
