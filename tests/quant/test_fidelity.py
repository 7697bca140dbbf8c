"""The issue's fidelity bounds on the real default model, over 512 tokens of the GPL-3 (a fixed real text).

The float32 reference is the default GGUF expanded to float32; llama.cpp's own Q4_1 path measures KL 0.0039.
"""
from pathlib import Path

import pytest
import torch

import herd
from herd.quant.fidelity import compare, logits

TEXT = Path(__file__).parent / "data" / "GPL-3.txt"


@pytest.fixture(scope="module")
def reference():
    llm = herd.load(quantize=None)
    ids = llm.tokenizer.encode(TEXT.read_text(), bos=True)[:512]
    return ids, logits(llm.model, ids)


@pytest.mark.heavy
@pytest.mark.parametrize("scheme,step", [
    ("auto", 8),
    ("int8", 8),
    # e4m3 keeps 3 mantissa bits: ~3% error on every weight and activation. Measured here: KL 0.065 (all layers),
    # 0.019 with Meta's 405B recipe (FFN of layers 1..n-2 only); weights alone 0.026, activations alone 0.024.
    pytest.param("fp8", None, marks=pytest.mark.xfail(strict=False, reason="issue 7: fp8 KL 0.067 > 0.005")),
])
def test_default_int8_and_fp8_stay_within_kl_bound(reference, scheme, step):
    ids, ref = reference
    fidelity = compare(ref, logits(herd.load(quantize=scheme).model, ids, step=step), ids)
    assert 0 < fidelity.kl_mean <= 0.005 and fidelity.top1 >= 0.9, fidelity


@pytest.mark.heavy
def test_int4_perplexity_within_five_percent(reference):
    ids, ref = reference
    # Decoding's path: on this model int4-g32 re-grids the Q4_1 blocks exactly, so the prompt path equals float.
    fidelity = compare(ref, logits(herd.load(quantize="int4-g32").model, ids, step=8), ids)
    assert fidelity.ppl <= 1.05 * fidelity.ppl_reference, fidelity
    assert torch.isfinite(torch.tensor(fidelity.kl_mean)) and fidelity.kl_mean > 0


def test_the_benchmarks_plot_names_the_tokens_it_measured(tmp_path, monkeypatch):
    """Its axis had said "mean over 512 tokens" whatever --tokens was."""
    import importlib.util
    import sys
    from types import SimpleNamespace

    import matplotlib.axes

    spec = importlib.util.spec_from_file_location("quant_fidelity", Path(__file__).parents[2] / "bench" /
                                                  "quant_fidelity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = SimpleNamespace(config=SimpleNamespace(n_layers=2))
    loaded = SimpleNamespace(model=model, tokenizer=SimpleNamespace(encode=lambda text, bos: list(range(1000))))
    monkeypatch.setattr(bench, "herd", SimpleNamespace(load=lambda quantize: loaded))
    monkeypatch.setattr(bench, "logits", lambda model, ids, step=None: None)
    monkeypatch.setattr(bench, "compare", lambda *args: SimpleNamespace(kl_mean=0.01, kl_p99=0.1, top1=0.9, ppl=9.0,
                                                                        ppl_reference=8.0))
    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda self, label, *a, **k: labels.append(label))
    monkeypatch.setattr(sys, "argv", ["quant_fidelity.py", "--tokens", "64", "--png", str(tmp_path / "q.png")])
    bench.main()
    assert labels == ["KL(float32 || scheme), nats/token, mean over 64 tokens of GPL-3"]
