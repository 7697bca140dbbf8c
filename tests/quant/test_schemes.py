"""Every scheme on a tiny model: close to float32, the right layers swapped, bad names and groups refused."""
import pytest
import torch

from herd.model import ModelConfig, Transformer
from herd.quant.blocks import BlockLinear
from herd.quant.fidelity import compare
from herd.quant.fp8 import FP8Linear, to_fp8
from herd.quant.gptq import gptq_int4, hessians
from herd.quant.schemes import Scheme, SchemeError, apply_scheme
from herd.quant.blocks import quantize_int4

CONFIG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=256)


def tiny():
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


@pytest.mark.parametrize("name,bound", [("int8", 2e-3), ("int8-wo", 1e-3), ("fp8", 5e-3), ("int4-g32", 0.05)])
def test_scheme_stays_close_to_float(name, bound):
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    model = tiny()
    with torch.inference_mode():
        reference = model(tokens)[0]
        apply_scheme(model, Scheme.parse(name))
        # one token at a time, as decoding runs (the integer path), and the whole prompt at once
        from herd.quant.fidelity import logits

        for step in (1, None):
            fidelity = compare(reference, logits(model, tokens[0].tolist(), step=step), tokens[0].tolist())
            assert 0 < fidelity.kl_mean < bound, (step, fidelity)
    swapped = FP8Linear if name == "fp8" else BlockLinear
    assert isinstance(model.layers[1].feed_forward.w2, swapped) and isinstance(model.output, swapped)


def test_int4_keeps_the_output_layer_at_8_bits():
    from herd.quant.fidelity import logits

    tokens = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        float_model = tiny()
        reference = float_model(torch.tensor([tokens]))[0]
        model = apply_scheme(tiny(), Scheme.parse("int4-g32"))
        assert model.output.bits == 8 and model.output.integer and model.layers[0].attention.wq.bits == 4
        eight_bit = compare(reference, logits(model, tokens, step=1), tokens).kl_mean
        model.output = BlockLinear(quantize_int4(float_model.output.weight, 32))
        four_bit = compare(reference, logits(model, tokens, step=1), tokens).kl_mean
    assert eight_bit < 0.5 * four_bit, (eight_bit, four_bit)


def test_kept_layers_stay_float():
    model = apply_scheme(tiny(), Scheme.parse("fp8", keep=("output", "layers.0.*")))
    assert type(model.output) is torch.nn.Linear and type(model.layers[0].attention.wq) is torch.nn.Linear
    assert isinstance(model.layers[1].attention.wq, FP8Linear)
    with pytest.raises(SchemeError, match="keep pattern 'layers.2.*' matches no quantized layer"):
        apply_scheme(tiny(), Scheme.parse("int8", keep=("output", "layers.2.*")))  # a typo must not pass unseen


def test_kept_layers_of_a_gguf_stay_float():
    """The default GGUF's tied output is its embedding table: keeping the output keeps both in float32."""
    import herd

    llm = herd.load(quantize=Scheme("gguf", keep=("output", "layers.0.*")))
    model = llm.model
    assert type(model.output) is torch.nn.Linear and type(model.tok_embeddings) is torch.nn.Embedding
    assert type(model.layers[0].attention.wq) is torch.nn.Linear
    assert isinstance(model.layers[1].attention.wq, BlockLinear)
    float_model = herd.load(quantize=None).model
    assert torch.equal(model.output.weight, float_model.output.weight)
    with pytest.raises(SchemeError, match="keep pattern 'layers.99.*' matches no quantized layer"):
        herd.load(quantize=Scheme("gguf", keep=("layers.99.*",)))


@pytest.mark.parametrize("tokens", [3, 40])  # herd's kernel from the codes on a CPU; then one expanded weight
def test_fp8_emulation_is_exact_e4m3_arithmetic(tokens):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(tokens, 64)
    xq, xs = to_fp8(x)
    wq, ws = to_fp8(linear.weight)
    # every product of two e4m3 values is exact in float64 and float32 alike; only the summation order differs
    expected = (xq.double() @ wq.double().T) * xs.double() * ws.double().T
    layer = apply_scheme(torch.nn.Sequential(linear), Scheme.parse("fp8"))[0]
    assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["int8", "int8-wo", "int4", "fp8"])
def test_non_finite_weights_are_refused_by_layer(name, bad):
    # They had been quantized quietly into blocks or rows of NaN.
    model = tiny()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[3, 5] = bad
    with pytest.raises(SchemeError, match=r"layers.1.feed_forward.w2.weight holds NaN or infinite values"):
        apply_scheme(model, Scheme.parse(name))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 tensor cores need a CUDA GPU")
@pytest.mark.parametrize("out_features, in_features", [(48, 64), (37, 24)])  # the second is no multiple of 16
def test_fp8_on_a_gpu_computes_as_the_emulation(out_features, in_features):
    """On a GPU with FP8 tensor cores the product had been rounded to bfloat16 (1e-3 relative), and widths that are
    no multiple of 16 had failed on their first forward; they are emulated there as on a CPU."""
    torch.manual_seed(0)
    layer = apply_scheme(torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)),
                         Scheme.parse("fp8"))[0]
    x = torch.randn(5, in_features)
    expected = layer(x)
    got = layer.cuda()(x.cuda()).cpu()
    # the tensor cores' float32 sums are not the CPU's, and Hopper's keep fewer bits while they add FP8 products
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_fp8_tensor_cores_fall_back_to_bfloat16_out_where_torch_refuses_float32(monkeypatch):
    """torch takes float32 out of a row-wise scaled FP8 product only on SM 9.0 with cuBLAS 12.9 or later: elsewhere
    (Ada GPUs) it had failed every forward. Its refusal is imitated here, on the CPU, with the emulation's numbers."""
    from herd.quant import fp8

    asked = []

    def scaled_mm(a, b, scale_a, scale_b, out_dtype):
        asked.append(out_dtype)
        if out_dtype == torch.float32:
            raise ValueError("Only bf16 and fp16 high precision output types are supported for row-wise scaling.")
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)

    monkeypatch.setattr(fp8, "_has_scaled_mm", lambda codes: True)
    monkeypatch.setattr(fp8, "_kernel", lambda codes: None)
    monkeypatch.setattr(fp8, "_FLOAT32_REFUSED", set())
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    torch.manual_seed(0)
    layer = apply_scheme(torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)), Scheme.parse("fp8"))[0]
    x = torch.randn(5, 64)
    xq, xs = fp8.to_fp8(x)
    exact = (xq.float() * xs) @ (layer.codes.float() * layer.scales[:, None]).T
    for _ in range(2):
        got = layer(x)
        assert got.dtype == torch.float32 and torch.allclose(got, exact, rtol=1e-2, atol=1e-2 * exact.abs().max())
    assert asked == [torch.float32, torch.bfloat16, torch.bfloat16]  # asked once, then remembered
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and asked[-1] == torch.bfloat16

    def out_of_memory(*args, **options):  # any other failure is raised, and float32 out asked for again after it
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fp8, "_FLOAT32_REFUSED", set())
    monkeypatch.setattr(torch, "_scaled_mm", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        layer(x)
    assert fp8._FLOAT32_REFUSED == set()


def test_gptq_makes_its_codes_on_the_weights_device():
    """Its codes, scales and mins had been made on the default device, the CPU: calibrated on a GPU, they met the
    weight there ("Expected all tensors to be on the same device"). A default device that is not the weight's
    shows the same without a GPU."""
    from herd.quant.gptq import gptq_int4

    torch.manual_seed(0)
    weight, x = torch.randn(16, 64), torch.randn(256, 64)
    expected = gptq_int4(weight, x.T @ x, 32)
    with torch.device("meta"):
        got = gptq_int4(weight, x.T @ x, 32)
    assert got.codes.device.type == "cpu" and torch.equal(got.codes, expected.codes)


@pytest.mark.parametrize("name,width,words", [
    ("int3", None, "unknown quantization scheme"), ("int4-g48", None, "group size 48"),
    # The way out named is one that works (it had been "use a divisor of 192", which no group size allowed is).
    ("int4-g128", 64 * 3, "does not divide the layer width 192: use int4 or int4-g64$"),
    ("int4-g128-gptq", 64 * 3, "width 192: use int4-gptq or int4-g64-gptq$"),  # the method asked for kept
    ("int4", 80, r"width 80: no int4 group \(32, 64, 128\) does; keep it in float \(--keep\) or use fp8$"),
    ("int8-wo", 80, r"int8-wo needs widths that are multiples of 32 .*; this layer's is 80"),
])
def test_bad_schemes_are_refused_with_a_reason(name, width, words):
    model = Transformer(CONFIG.replace(dim=width, n_heads=4, ffn_hidden_dim=width)).eval() if width else tiny()
    with pytest.raises(SchemeError, match=words):
        apply_scheme(model, Scheme.parse(name))


@pytest.mark.parametrize("made,words", [
    # A scheme's name as its kind had loaded unquantized, the GGUF's own blocks computing instead.
    (lambda: Scheme("int4-g64-gptq"), r"not a kind of scheme: use Scheme.parse\('int4-g64-gptq'\)"),
    (lambda: Scheme("bogus"), "not a kind of scheme: use one of gguf, int8, int8-wo, int4, fp8"),
    (lambda: Scheme("int4", 48), "group size 48"),
    (lambda: Scheme("int8", method="gptq"), "method 'gptq' is not one int8 takes"),
])
def test_a_scheme_made_by_hand_is_checked_as_a_parsed_one(made, words):
    with pytest.raises(SchemeError, match=words):
        made()
    assert Scheme("int4", 64, "gptq") == Scheme.parse("int4-g64-gptq")


def test_gptq_beats_round_to_nearest_on_its_calibration_objective():
    torch.manual_seed(0)
    # correlated inputs with a few large channels: where spreading the rounding error pays
    mix = torch.randn(128, 128) * (torch.rand(128) ** 4 * 4)
    x = torch.randn(2048, 128) @ mix
    linear = torch.nn.Linear(128, 64, bias=False)
    h = hessians({"linear": linear}, lambda: linear(x))["linear"]

    def error(w):
        return ((x @ (w.dequantize() - linear.weight).T) ** 2).mean()

    with torch.no_grad():
        assert error(gptq_int4(linear.weight, h, 32)) < 0.85 * error(quantize_int4(linear.weight, 32))


def test_layers_reading_one_input_share_its_hessian_and_its_inverse(monkeypatch):
    """A block's q, k and v projections (gate and up) read one tensor: one X^T X for them, one inverse for GPTQ,
    let go with the Hessian."""
    import gc

    from herd.quant import gptq

    torch.manual_seed(0)
    q, k, o = torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 32)
    x = torch.randn(4, 16, 64)
    h = hessians({"q": q, "k": k, "o": o}, lambda: [o(q(x) + k(x)) for x in (x, x + 1)])
    assert h["q"] is h["k"] and h["o"] is not h["q"]
    both = torch.cat([x, x + 1]).reshape(-1, 64).double()
    assert torch.allclose(h["q"].double(), both.T @ both / len(both), rtol=1e-6)
    calls = []
    cholesky = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda *a, **kw: calls.append(1) or cholesky(*a, **kw))
    codes = [gptq_int4(layer.weight, h["q"], 32).codes for layer in (q, k)]
    assert len(calls) == 2  # one factorisation (two Cholesky decompositions) for both
    assert torch.equal(codes[1], gptq_int4(k.weight, h["q"].clone(), 32).codes) and len(calls) == 4
    del h
    gc.collect()
    assert gptq._last_factor == [None, None, None]


@pytest.mark.parametrize("quantize", ["int4", "int8", "int8-row", "fp8"])
def test_a_weight_quantized_in_row_chunks_is_quantized_as_a_whole(quantize, monkeypatch):
    # The quantizers take a large weight a few million elements at a time, so that their float temporaries stay
    # small (an 8B output layer is 2 GB in float32); rows are independent, so the chunks change no bit.
    from herd.quant import blocks, fp8

    torch.manual_seed(0)
    weight = (torch.randn(2100, 128) * torch.rand(2100, 1)).bfloat16()  # rows of different scales, stored bf16
    run = {"int4": lambda w: blocks.quantize_int4(w, 32), "int8": lambda w: blocks.quantize_int8(w, 32),
           "int8-row": lambda w: blocks.quantize_int8(w), "fp8": lambda w: fp8.quantize_fp8(w)}[quantize]
    monkeypatch.setattr(blocks, "row_chunks", lambda n, k: [slice(i, min(n, i + 500)) for i in range(0, n, 500)])
    monkeypatch.setattr(fp8, "row_chunks", blocks.row_chunks)
    chunked = run(weight)
    monkeypatch.setattr(blocks, "row_chunks", lambda n, k: [slice(0, n)])
    monkeypatch.setattr(fp8, "row_chunks", blocks.row_chunks)
    whole = run(weight)
    for a, b in zip(vars(chunked).values(), vars(whole).values()):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
