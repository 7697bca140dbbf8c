"""Int8Linear against the float32 layer it replaces."""
import pytest
import torch
from torch import nn

from herd.model import ModelConfig, Transformer
from herd.quant import Int8Linear, quantize_int8


def relative_error(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.mark.parametrize("fbgemm", [True, False])
def test_every_token_keeps_its_precision_beside_an_outlier_token(fbgemm):
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=False)
    x = torch.randn(1, 6, 256)
    x[0, 0] *= 1000  # the first token of a prompt is often orders of magnitude larger
    with torch.inference_mode():
        assert relative_error(Int8Linear(linear, fbgemm=fbgemm)(x), linear(x)) < 0.03


def test_worst_case_products_do_not_saturate():
    # Every weight at its row's maximum and every activation at the top of the uint8 range: pair sums a 16-bit
    # accumulator would clip (2 * 255 * 127 > 32767). Int8Linear uses full-range activations because FBGEMM doesn't.
    linear = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.5)
    x = torch.full((1, 64), 3.0)
    x[0, 0] = 0.0  # the range [0, 3]: 3.0 becomes uint8 255 everywhere else
    with torch.inference_mode():
        assert relative_error(Int8Linear(linear)(x), linear(x)) < 0.01


def test_quantized_model_stays_close_to_float():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                    ffn_hidden_dim=256)).eval()
    tokens = torch.randint(0, 512, (2, 16))
    with torch.inference_mode():
        reference = model(tokens)
        quantize_int8(model)
        assert isinstance(model.layers[1].feed_forward.w2, Int8Linear) and isinstance(model.output, Int8Linear)
        assert relative_error(model(tokens), reference) < 0.05
