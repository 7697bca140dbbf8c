"""The transformer against independent references: Hugging Face's Llama (counts, RoPE) and its own full forward."""
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from herd.model import CONFIGS, KVCache, ModelConfig, RopeScaling, Transformer
from herd.model.llama import rope_frequencies
from herd.model.summary import parameter_count

PUBLISHED_BILLIONS = {  # Meta's model cards
    "llama3-8b": 8.03, "llama3.1-8b": 8.03, "llama3-70b": 70.6, "llama3.1-70b": 70.6,
    "llama3.1-405b": 405.9, "llama3.2-1b": 1.24, "llama3.2-3b": 3.21,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_parameter_counts_match_published_and_transformers(name):
    config = CONFIGS[name]
    count = parameter_count(config)
    assert round(count / 1e9, 2 if count < 1e10 else 1) == PUBLISHED_BILLIONS[name]
    hf_config = LlamaConfig(
        hidden_size=config.dim, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, intermediate_size=config.hidden_dim, vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_embeddings,
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_config)
    assert count == sum(p.numel() for p in hf.parameters())


def test_ffn_sizing_rule_gives_the_published_widths():
    assert [CONFIGS[n].hidden_dim for n in ("llama3-8b", "llama3-70b", "llama3.1-405b", "llama3.2-1b", "llama3.2-3b")] \
        == [14336, 28672, 53248, 8192, 8192]


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0), RopeScaling(32.0)])
def test_rope_frequencies_match_transformers(scaling):
    head_dim = 128
    params = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling:
        params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": scaling.factor,
                  "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                  "original_max_position_embeddings": scaling.original_max_position}
    hf_config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072,
                            rope_parameters=params)
    init = ROPE_INIT_FUNCTIONS[params["rope_type"]] if scaling else None
    expected = init(hf_config, "cpu")[0] if init else 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2) / head_dim))
    ours = rope_frequencies(head_dim, 500000.0, scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    if scaling:  # the lowest frequencies are slowed by the factor, the highest kept
        assert ours[-1] == pytest.approx(rope_frequencies(head_dim, 500000.0, None)[-1] / scaling.factor)
        assert ours[0] == rope_frequencies(head_dim, 500000.0, None)[0]


TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=96, max_seq_len=128,
                   rope_scaling=RopeScaling(8.0))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(TINY).eval()


@torch.inference_mode()
def test_incremental_decoding_with_the_cache_equals_a_full_forward(model):
    tokens = torch.randint(0, 256, (2, 24))
    full = model(tokens)
    cache = KVCache(TINY, 2, 32)
    pieces = [model(tokens[:, :9], cache=cache)]  # a prefill, then a chunk, then one token at a time
    pieces.append(model(tokens[:, 9:15], cache=cache))
    pieces += [model(tokens[:, i:i + 1], cache=cache) for i in range(15, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 24
    with pytest.raises(ValueError, match="KV cache holds 32 tokens"):
        model(torch.randint(0, 256, (2, 9)), cache=cache)


@torch.inference_mode()
def test_left_padded_rows_get_the_logits_they_get_alone(model):
    long, short = torch.randint(0, 256, (12,)), torch.randint(0, 256, (5,))
    cache = KVCache(TINY, 2, 16, start=torch.tensor([0, 7]))
    batch = torch.stack([long, torch.cat([torch.zeros(7, dtype=torch.long), short])])
    out = model(batch, cache=cache)
    torch.testing.assert_close(out[0], model(long[None])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 7:], model(short[None])[0], rtol=0, atol=1e-5)
    step = model(torch.tensor([[3], [4]]), cache=cache)  # decoding continues at each row's own position
    alone = model(torch.cat([short, torch.tensor([4])])[None])[0, -1]
    torch.testing.assert_close(step[1, 0], alone, rtol=0, atol=1e-5)
    assert torch.isfinite(out).all()


@torch.inference_mode()
def test_document_mask_gives_each_packed_document_its_own_logits(model):
    lengths = [5, 11, 3, 13]
    docs = [torch.randint(0, 256, (n,)) for n in lengths]
    packed = torch.cat(docs)[None]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    out = model(packed, document_ids=ids)
    offset = 0
    for doc in docs:
        torch.testing.assert_close(out[0, offset:offset + len(doc)], model(doc[None])[0], rtol=0, atol=1e-5)
        offset += len(doc)
    # Without the mask the later documents would see the earlier ones.
    assert not torch.allclose(model(packed)[0, 5:16], out[0, 5:16], atol=1e-3)


@torch.inference_mode()
def test_explicit_positions_shift_the_rotary_phase(model):
    tokens = torch.randint(0, 256, (1, 6))
    far = torch.arange(9000, 9006)[None]  # past the original 8192 context, where the 3.1 scaling acts
    shifted = model(tokens, positions=far)
    # Attention depends on relative positions only: the same tokens at shifted positions give the same logits.
    torch.testing.assert_close(shifted, model(tokens), rtol=0, atol=1e-4)
    assert not torch.allclose(model(tokens, positions=torch.tensor([[0, 1, 2, 3, 4, 900]])), shifted, atol=1e-3)


def test_the_size_bound_counts_parameters_as_the_model_has_them():
    for config in CONFIGS.values():  # the bound's own count, in floating point, against the modules' (meta device)
        assert abs(config._size() / parameter_count(config) - 1) < 0.02


def test_tied_embeddings_share_one_tensor():
    model = Transformer(TINY.replace(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert parameter_count(TINY.replace(tie_embeddings=True)) == parameter_count(TINY) - 256 * 64


@pytest.mark.parametrize("changes, words", [
    (dict(n_heads=0), "n_heads must be at least 1, got 0"),
    (dict(dim=0), "dim must be at least 1, got 0"),
    (dict(dim=12, n_heads=4, n_kv_heads=2), "dim / n_heads = 3 is odd"),
    (dict(norm_eps=float("nan")), "norm_eps must be at least 0, got nan"),
    # Each had reached the memory allocator, or built modules until memory ran out (herd info, herd train).
    (dict(n_layers=4_000_000_000), "n_layers must be in [1, 10000], got 4000000000"),
    (dict(ffn_dim_multiplier=1e30), "describes 6.55e+34 parameters"),
    (dict(ffn_dim_multiplier=1e308), "describes inf parameters"),
    (dict(dim=1 << 30, n_heads=1 << 10, n_kv_heads=1 << 10), "(ffn_dim_multiplier)"),
])
def test_impossible_shapes_are_refused_naming_the_field(changes, words):
    """Shapes no model has, or that no machine holds, each a ValueError that says which."""
    with pytest.raises(ValueError, match=re.escape(words)):
        ModelConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256), **changes})
