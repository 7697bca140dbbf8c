"""`herd quantize` outputs: loaded as stored, expanded back by convert, refused when damaged, never half-written."""
import re
import subprocess
import sys

import pytest
import torch

import herd
from herd.checkpoint import CheckpointError, convert, load_checkpoint, save_checkpoint
from herd.model import ModelConfig, Transformer
from herd.quant import blocks
from herd.quant.blocks import BlockLinear
from herd.quant.fp8 import FP8Linear
from herd.quant.schemes import Scheme, apply_scheme
from herd.quant.store import FILE


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny float checkpoint with the real Llama 3 tokenizer."""
    torch.manual_seed(0)
    config = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=256)
    model = Transformer(config)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("float") / "tiny"
    save_checkpoint((config, model.state_dict(), herd.load_tokenizer()), out, "meta")
    return out


def quantized(source, scheme: str, out):
    """`herd quantize SOURCE --scheme SCHEME --out OUT`, in this process (the command itself is run above)."""
    from herd.quant.cli import quantize

    quantize(str(source), scheme, out, None, None, None)


def run_quantize(*args):
    return subprocess.run([sys.executable, "-m", "herd.cli", "quantize", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("scheme,module", [("int4-g64", BlockLinear), ("fp8", FP8Linear)])
def test_quantized_model_loads_as_stored_and_converts_back(float_dir, tmp_path, scheme, module, monkeypatch):
    out = tmp_path / "q"
    result = run_quantize(str(float_dir), "--scheme", scheme, "--out", str(out))
    assert result.returncode == 0, result.stderr
    # as readable as the config beside it (safetensors 0.8 alone would leave the weights 0600)
    assert (out / FILE).stat().st_mode == (out / "config.json").stat().st_mode
    loaded = herd.load(out)
    assert isinstance(loaded.model.layers[0].feed_forward.w1, module)
    expected = apply_scheme(herd.load(float_dir, quantize=None).model, Scheme.parse(scheme))
    tokens = torch.tensor([loaded.tokenizer.encode("a test sentence, long enough to be computed as a prompt is")])
    with torch.inference_mode():
        assert torch.equal(loaded.model(tokens), expected(tokens))
        # expanded back to float weights: the stored weights (fp8 also quantizes activations, which no file holds)
        back = herd.load(convert(out, tmp_path / "back", "hf"), quantize=None).model
        w1 = loaded.model.layers[0].feed_forward.w1
        stored = w1.codes.float() * w1.scales[:, None] if scheme == "fp8" else w1.weight_blocks.dequantize()
        assert torch.allclose(back.layers[0].feed_forward.w1.weight, stored, atol=1e-6)
        if scheme != "fp8":
            monkeypatch.setattr(blocks, "ops", lambda: None)  # without the kernel a prompt multiplies exactly
            assert torch.allclose(back(tokens), expected(tokens), atol=1e-4)
    # a GGUF's own blocks are no scheme for it (an internal TypeError before)
    with pytest.raises(ValueError, match="quantize 'gguf' computes a GGUF file's own blocks"):
        herd.load(out, quantize="gguf")


def test_damaged_files_are_refused(float_dir, tmp_path):
    out = tmp_path / "q"
    quantized(float_dir, "int8", out)
    data = bytearray((out / FILE).read_bytes())
    data[-100] ^= 0xFF  # one flipped bit in the last tensor
    (out / FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(out)
    (out / FILE).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_checkpoint(out)
    data[-100] ^= 0xFF
    (out / FILE).write_bytes(bytes(data))
    tokenizer = out / "tokenizer.json"
    tokenizer.write_text("{")  # a damaged tokenizer is named, not called missing
    with pytest.raises(herd.llm.ModelNotFoundError, match=f"no usable tokenizer: {tokenizer}"):
        herd.load(out)


def test_bad_scheme_is_one_line_and_writes_nothing(float_dir, tmp_path):
    result = run_quantize(str(float_dir), "--scheme", "int5", "--out", str(tmp_path / "q"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("herd: error: unknown quantization scheme 'int5'")
    assert list(tmp_path.iterdir()) == []


def test_the_gguf_scheme_on_a_model_with_no_gguf_blocks_is_refused_and_writes_nothing(float_dir, tmp_path):
    # It had written the float model, labelled quantized.
    from herd.quant.cli import quantize

    with pytest.raises(ValueError, match="holds no GGUF quantized tensors for the gguf scheme to keep"):
        quantize(str(float_dir), "gguf", tmp_path / "q", None, None, None)
    assert list(tmp_path.iterdir()) == []


def test_gptq_calibrates_on_the_text_it_is_given(float_dir, tmp_path):
    """`--calibration` files (plain text, JSON Lines) are the text GPTQ's Hessians come from: their documents from
    a BOS each, cut at `--calibration-tokens`; the file records what calibrated it; bad calibration input is one
    line before any work."""
    import json

    from safetensors import safe_open

    from herd.quant.calibration import calibration_tokens
    from herd.quant.schemes import Calibration

    tokenizer = herd.load_tokenizer()
    notes = tmp_path / "notes.txt"
    notes.write_text("Llamas hum when they are curious. " * 40)
    records = tmp_path / "records.jsonl"
    # A line separator written as itself inside a JSON string (json.dumps(..., ensure_ascii=False) does) ends no
    # JSON Lines record; a byte-order mark (Windows editors write one) opens none.
    vicunas = "Vicunas live high in the Andes.\u2028" * 40
    records.write_text("\ufeff" + json.dumps({"text": "Alpacas were bred for fibre. " * 40}) + "\n\n"
                       + json.dumps({"text": vicunas}, ensure_ascii=False) + "\n", encoding="utf-8")
    documents = [notes.read_text(), "Alpacas were bred for fibre. " * 40, vicunas]
    every = [t for d in documents for t in tokenizer.encode(d, bos=True)]
    assert calibration_tokens(Calibration((str(notes), str(records)), tokens=10_000), tokenizer) == every
    assert calibration_tokens(Calibration((str(notes), str(records)), tokens=300), tokenizer) == every[:300]

    from herd.quant.cli import quantize

    outs = {}
    for name, files, tokens in (("default", None, None), ("given", [notes, records], 300)):
        outs[name] = tmp_path / name
        quantize(str(float_dir), "int4-g32-gptq", outs[name], None, files, tokens)
    header = {name: json.loads(safe_open(str(out / FILE), "pt").metadata()["herd.quantization"])
              for name, out in outs.items()}
    assert header["given"]["scheme"]["calibration"] == {"files": ["notes.txt", "records.jsonl"], "tokens": 300,
                                                        "window": 512}
    codes = {name: load_checkpoint(out).blocks["layers.1.feed_forward.w2.weight"][1].weight_blocks.codes
             for name, out in outs.items()}
    assert not torch.equal(codes["default"], codes["given"])

    # Bad calibration input (the CLI's one line for any such error is tested above): refused before any work.
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    (tmp_path / "empty.txt").write_text("")
    for scheme, files, tokens, error in (
        ("int4-gptq", [tmp_path / "empty.txt"], None, f"the calibration text {tmp_path / 'empty.txt'} holds no text"),
        ("int4-gptq", [tmp_path / "bad.jsonl"], None, f"calibration file {tmp_path / 'bad.jsonl'}:1: no "
                                                      '"text" string in this row'),
        ("int4-gptq", [tmp_path / "missing.txt"], None, f"calibration file {tmp_path / 'missing.txt'} not found"),
        ("int8", None, 100, "--calibration and --calibration-tokens calibrate GPTQ; int8 takes none"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=f"^{re.escape(error)}"):
            quantize(str(float_dir), scheme, tmp_path / "bad", None, files, tokens)
    assert not (tmp_path / "bad").exists()


def test_unwritable_out_is_one_line_before_any_work(float_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run_quantize(str(float_dir), "--scheme", "int8", "--out", str(tmp_path / "a-file" / "q"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"herd: error: cannot write {tmp_path / 'a-file' / 'q'}: Not a "
                                                      "directory; give --out a directory you can write to")


def test_a_tied_model_whose_output_alone_is_quantized_expands_to_that_output(tmp_path):
    """fp8 quantizes the output layer of a tied model (SmolLM2, Llama 3.2 1B/3B) but not the table: expanded, the
    model keeps the output it computed with (the tied config had dropped it for the float table, off by up to 0.07
    on the default model)."""
    torch.manual_seed(0)
    config = ModelConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=256,
                         tie_embeddings=True)
    model = Transformer(config)
    source = save_checkpoint((config, model.state_dict(), herd.load_tokenizer()), tmp_path / "float", "meta")
    quantized(source, "fp8", tmp_path / "q")
    output = herd.load(tmp_path / "q").model.output
    stored = output.codes.float() * output.scales[:, None]
    for back in (herd.load(tmp_path / "q", quantize=None).model,
                 herd.load(convert(tmp_path / "q", tmp_path / "hf", "hf"), quantize=None).model):
        assert torch.equal(back.output.weight, stored)
        assert not torch.equal(back.tok_embeddings.weight, stored)   # the table stays as it was


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_embedding_table_is_stored_in_int8_blocks(tmp_path, tied):
    """int8 holds the embedding table in int8 blocks of 32, in the model and in the file, not as float32 (4 bytes a
    weight); a tied table looks its rows up in the output layer's own blocks."""
    torch.manual_seed(0)
    config = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=256,
                         tie_embeddings=tied)
    model = Transformer(config)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 0.02)
    source = save_checkpoint((config, model.state_dict(), herd.load_tokenizer()), tmp_path / "float", "meta")
    fresh = apply_scheme(herd.load(source, quantize=None).model, Scheme.parse("int8"))
    table = fresh.tok_embeddings
    assert isinstance(table, blocks.BlockEmbedding) and (table.codes is fresh.output.codes) == tied
    tokens = torch.tensor([[5, 128000, 77, 9]])
    with torch.no_grad():
        expected = blocks.quantize_int8(model.tok_embeddings.weight, 32).dequantize()[tokens]
        assert torch.equal(table(tokens), expected)
    quantized(source, "int8", tmp_path / "q")
    tables = 1 if tied else 2
    assert (tmp_path / "q" / FILE).stat().st_size < 1.3 * tables * config.vocab_size * config.dim  # no float copy
    loaded = herd.load(tmp_path / "q").model
    assert isinstance(loaded.tok_embeddings, blocks.BlockEmbedding) and loaded.output.integer
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), fresh(tokens))
    if blocks.ops() is not None:  # once the model has run, its layers hold only panels: the table's only copy too
        linears = [m for m in loaded.modules() if isinstance(m, blocks.BlockLinear) and m.integer]
        assert len(linears) == 11  # five a block (wv and w2 take float activations under int8), and the output
        assert all([n for n, _ in m.named_buffers()] == ["packed"] for m in linears)
        held = [name for name, _ in loaded.named_buffers() if name.startswith(("tok_embeddings", "output"))]
        assert held == (["output.packed"] if tied else ["tok_embeddings.codes", "tok_embeddings.scales",
                                                        "output.packed"])
        with torch.no_grad():
            assert torch.equal(loaded.tok_embeddings(tokens), expected)
            assert torch.equal(loaded.tok_embeddings.weight_blocks.dequantize(), table.weight_blocks.dequantize())
    kept = apply_scheme(herd.load(source, quantize=None).model, Scheme.parse("int8", keep=("tok_embeddings",)))
    assert type(kept.tok_embeddings) is torch.nn.Embedding
    assert (type(kept.output) is torch.nn.Linear and kept.output.weight is kept.tok_embeddings.weight) == tied


@pytest.mark.parametrize("scheme,most_alive", [("int8", 1), ("int4", 1), ("fp8", 1), ("int4-g32-gptq", 7)])
def test_a_checkpoint_is_quantized_one_float_weight_at_a_time(float_dir, tmp_path, monkeypatch, scheme, most_alive):
    """Quantizing as it loads, a model never holds its float weights all at once (8B's: 32 GB in float32, beyond
    the 24 GB of the machines herd is built on): every matrix is read from a bfloat16 checkpoint, as they ship,
    quantized and dropped before the next one is read, and it stays bfloat16 (the quantizers widen a few rows at a
    time: 8B's output layer in float32 is 2 GB). GPTQ's calibration runs the float model a block at a time: one
    block's seven matrices at once."""
    import weakref

    from herd.checkpoint.base import LazyStateDict

    ckpt = load_checkpoint(float_dir, dtype=torch.bfloat16)
    source = save_checkpoint(ckpt, tmp_path / "bf16", "hf")
    read, most, stored = [], [0], []

    def tracked(method):
        def reading(self, name):
            tensor = method(self, name)
            if tensor.dim() == 2:
                read.append(weakref.ref(tensor))
                most[0] = max(most[0], sum(r() is not None for r in read))
                if method is original_stored:
                    stored.append(tensor.dtype)
            return tensor
        return reading

    original_stored = LazyStateDict.stored
    for name in ("__getitem__", "stored"):
        monkeypatch.setattr(LazyStateDict, name, tracked(getattr(LazyStateDict, name)))
    model = herd.load(source, quantize=scheme).model
    assert len(read) >= 2 * 7 + 2 and most[0] == most_alive  # two layers' seven matrices, the table, the output
    # the quantized matrices as stored (fp8 keeps the table in float32; GPTQ's calibration computes in float32)
    assert stored == [] if "gptq" in scheme else len(stored) >= 2 * 7 + 1 and set(stored) == {torch.bfloat16}
    assert isinstance(model.layers[1].feed_forward.w2, FP8Linear if scheme == "fp8" else BlockLinear)


def test_gptq_calibrates_each_block_on_the_quantized_blocks_before_it(float_dir, monkeypatch):
    """As GPTQ's reference code does: a block's Hessians come from the hidden states that the blocks before it give
    once quantized, so the attention inputs' Hessians handed to GPTQ are those of the quantized model it returns,
    and block 1's differ from the float model's."""
    from herd.quant.calibration import LayerwiseHessians, calibration_tokens
    from herd.quant.gptq import hessians
    from herd.quant.schemes import Calibration

    given, original = {}, LayerwiseHessians.__getitem__

    def recording(self, name):
        given[name] = original(self, name)
        return given[name]

    monkeypatch.setattr(LayerwiseHessians, "__getitem__", recording)
    quantized = herd.load(float_dir, quantize="int4-g32-gptq")
    ids = calibration_tokens(Calibration(), quantized.tokenizer)
    names = [f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wk", "wv")]

    def inputs(model):
        return hessians({name: model.get_submodule(name) for name in names},
                        lambda: [model(torch.tensor([ids[i : i + 512]])) for i in range(0, len(ids), 512)])

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    floating = herd.load(float_dir, quantize=None).model
    quantized.model.tok_embeddings = floating.tok_embeddings  # calibration looks tokens up in the float table
    final, floats = inputs(quantized.model), inputs(floating)
    assert all(relative(given[name], final[name]) < 1e-5 for name in names)
    assert relative(given["layers.0.attention.wq"], floats["layers.0.attention.wq"]) < 1e-5
    assert relative(given["layers.1.attention.wq"], floats["layers.1.attention.wq"]) > 1e-3


def test_a_load_that_cannot_fit_is_refused_before_any_weight_is_read(float_dir, tmp_path, monkeypatch):
    """The system would kill the process midway, without a word: a load whose peak would not fit is refused, with
    the schemes that would fit, before a weight is read; a scheme that fits goes ahead. (A bfloat16 checkpoint, as
    they ship: this tiny model's float32 table read twice over would outweigh the whole model in float32.)"""
    from herd.checkpoint.base import LazyStateDict
    from herd.quant import load

    float_dir = save_checkpoint(load_checkpoint(float_dir, dtype=torch.bfloat16), tmp_path / "bf16", "hf")
    ckpt = load_checkpoint(float_dir)
    need = {name: load.memory_needed(ckpt, Scheme.parse(name)) for name in ("int8", "int4")}
    assert need["int4"] < need["int8"] < load.memory_needed(ckpt, None)
    with monkeypatch.context() as patch:
        for method in ("__getitem__", "stored"):
            patch.setattr(LazyStateDict, method, lambda self, name: pytest.fail(f"{name} was read"))
        patch.setattr(load, "available_memory", lambda: (need["int4"] + need["int8"]) / 2 / 0.95)
        for quantize, held in ((None, "in float32"), ("int8", "as int8")):
            with pytest.raises(MemoryError, match=rf"needs \d+\.\d GiB of memory {held} but \d+\.\d GiB are "
                                                  r"available: load it with quantize int4 \(about \d+\.\d GiB\), "
                                                  "which quantize each weight as it is read$"):
                herd.load(float_dir, quantize=quantize)
        patch.setattr(load, "available_memory", lambda: need["int4"] / 2)
        with pytest.raises(MemoryError, match=r"in float32 but .* available: even int4 needs about \d+\.\d GiB: run "
                                              "it on a machine with more memory$"):
            herd.load(float_dir, quantize=None)
        with pytest.raises(MemoryError, match=r"as int4-g32 but .* available: run it on a machine with more memory$"):
            herd.load(float_dir, quantize="int4")
    monkeypatch.setattr(load, "available_memory", lambda: need["int4"] / 0.9)
    assert isinstance(herd.load(float_dir, quantize="int4").model.layers[0].attention.wq, BlockLinear)


def test_a_quantizing_load_is_sized_with_its_weights_as_stored(float_dir, tmp_path):
    """The largest weight is read as the checkpoint stores it: a float32 checkpoint's at 4 bytes an element, a
    bfloat16 one's at 2 (the headers say which; nothing is read)."""
    import math

    from herd.checkpoint.base import expected_shapes
    from herd.quant import load

    f32 = load_checkpoint(float_dir)
    bf16 = load_checkpoint(save_checkpoint(load_checkpoint(float_dir, dtype=torch.bfloat16), tmp_path / "bf16", "hf"))
    assert f32.state_dict.stored_dtype("layers.0.attention.wq.weight") == torch.float32
    assert bf16.state_dict.stored_dtype("layers.0.attention.wq.weight") == torch.bfloat16
    largest = max(math.prod(shape) for shape in expected_shapes(f32.config).values())
    for scheme in ("int8", "int4"):
        assert load.memory_needed(f32, Scheme.parse(scheme)) - load.memory_needed(bf16, Scheme.parse(scheme)) \
            == 2 * largest * 2


def test_a_quantized_file_that_cannot_fit_is_refused_before_it_is_read(float_dir, tmp_path, monkeypatch):
    from herd.quant import load, store

    out = tmp_path / "q"
    quantized(float_dir, "int8", out)
    size = (out / FILE).stat().st_size
    with monkeypatch.context() as patch:
        patch.setattr(store, "_hashed", lambda items: pytest.fail("a tensor was read"))
        patch.setattr(load, "available_memory", lambda: size)
        with pytest.raises(MemoryError, match=rf"{FILE}: this int8 model needs \d+\.\d GiB of memory but \d+\.\d GiB "
                                              "are available: run it on a machine with more memory, or quantize the float "
                                              "model with int4$"):
            herd.load(out)
    monkeypatch.setattr(load, "available_memory", lambda: 3 * size)
    assert isinstance(herd.load(out).model.layers[0].attention.wq, BlockLinear)


def test_a_gguf_is_sized_as_herd_holds_it_and_refused_when_it_cannot_fit(monkeypatch):
    from herd.llm import resolve_model_path
    from herd.quant import load

    ckpt = load_checkpoint(resolve_model_path(None))
    need = load.memory_needed(ckpt, Scheme("gguf"))
    model = herd.load().model  # not run yet: its blocks as converted from the file
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # the tied table once
    assert need == sum(t.numel() * t.element_size() for t in tensors.values())
    monkeypatch.setattr(load, "available_memory", lambda: need // 2)
    with pytest.raises(MemoryError, match=r"needs 0\.1 GiB of memory as gguf but 0\.\d GiB are available: "):
        herd.load()


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory):
    """An int8 file as `herd quantize` writes it, of a small model (vocabulary 256: fast to write and read)."""
    from herd.quant.store import save_quantized

    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=128)
    path = tmp_path_factory.mktemp("q") / FILE
    save_quantized(apply_scheme(Transformer(config), Scheme.parse("int8")), Scheme.parse("int8").to_dict(), path)
    return path


def rewritten(path, tmp_path, change):
    """A copy of the quantized file at `path` whose header `change(header)` has edited, as by hand."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from herd.quant.store import KEY

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    header = json.loads(metadata[KEY])
    header = change(header) or header
    out = tmp_path / FILE
    save_file(load_file(path), str(out), metadata=metadata | {KEY: json.dumps(header)})
    return out


def every_module(field, value):
    def change(header):
        for spec in header["modules"].values():
            spec[field] = value
    return change


@pytest.mark.parametrize("change,error", [
    (every_module("group", 7), "modules.tok_embeddings.group is 7, which does not divide the width 64"),
    (every_module("group", 64), r"modules.tok_embeddings.group is 64, but .*scales has shape \[256, 2\]"),
    (every_module("bits", 3), "modules.tok_embeddings.bits is 3, not 4 or 8"),
    (every_module("integer", "yes"), 'modules.tok_embeddings.integer is "yes", not true or false'),
    (lambda header: header["scheme"].update(kind="bogus"), 'scheme.kind is "bogus", not one of gguf, int8'),
    (lambda header: header | {"modules": "wq"}, 'modules is "wq", not an object'),
    (lambda header: header | {"scheme": "int8"}, 'scheme is "int8", not an object'),
    (lambda header: header | {"version": 3}, "version is 3, not 1 or 2"),
    (every_module("integer", False), "header_sha256 does not match the header"),  # valid, but not what was written
    # Built as the type said: torch's index_select error, or an AttributeError, naming no file.
    (lambda header: header["modules"]["tok_embeddings"].update(type="linear"),
     'modules.tok_embeddings.type is "linear", but tok_embeddings is the embedding table'),
    (lambda header: header["modules"]["layers.0.attention.wq"].update(type="embedding"),
     r'modules.layers.0.attention.wq.type is "embedding", but layers.0.attention.wq is a linear layer'),
], ids=["group", "group-shape", "bits", "integer", "kind", "modules", "scheme", "version", "digest", "table-type",
        "linear-type"])
def test_a_changed_header_is_refused_naming_the_file_and_field(quantized_file, tmp_path, change, error):
    """The tensors' checksums do not cover the header: a changed group or bit width had loaded, verified and
    generated garbage; a changed type failed as an AttributeError naming no file."""
    from herd.quant.store import load_quantized

    changed = rewritten(quantized_file, tmp_path, change)
    with pytest.raises(CheckpointError, match=f"^{changed}: herd.quantization {error}.*; the file was modified or "
                                              "damaged: quantize the model again$"):
        load_quantized(changed, None)


def test_files_from_before_the_header_digest_still_load_and_are_checked(quantized_file, tmp_path):
    from herd.quant.store import load_quantized

    def version_1(header):
        return {key: value for key, value in header.items() if key not in ("version", "header_sha256")}

    state, modules, scheme = load_quantized(rewritten(quantized_file, tmp_path, version_1), None)
    assert scheme["kind"] == "int8" and len(modules) == 9  # seven layers, the output and the table
    with pytest.raises(CheckpointError, match="group is 7"):
        load_quantized(rewritten(quantized_file, tmp_path, lambda h: every_module("group", 7)(h) or version_1(h)),
                       None)


def test_an_out_that_is_no_checkpoint_or_the_source_is_refused_before_any_work(float_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from herd.quant.cli import quantize

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f".mine.tmp-{gone.pid}").mkdir()  # what a quantize killed by SIGKILL leaves
    monkeypatch.setattr(herd, "load", lambda *args, **kwargs: pytest.fail("the model loaded before the refusal"))
    monkeypatch.chdir(mine)
    for out, error in ((mine, f"{mine}: exists and holds keep.txt, which is no checkpoint file"),
                       (Path("."), f"{mine}: exists and holds keep.txt"),  # "." by its real name, which renames need
                       (float_dir.parent, f"{float_dir.parent}: is or holds the checkpoint being read")):
        with pytest.raises(CheckpointError, match=f"^{error}"):
            quantize(str(float_dir), "int8", out, None, None, None)
    assert (mine / "keep.txt").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
