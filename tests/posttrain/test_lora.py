"""LoRA / QLoRA wrapped around the model from outside: merging, export, gradients through quantized bases."""
from __future__ import annotations

import pytest
import torch

import herd
from herd.checkpoint import convert, save_checkpoint
from herd.posttrain.lora import LoRAConfig, LoRALinear, adapters_off, apply_lora, lora_state_dict, merge_lora
from herd.quant.blocks import BlockLinear
from posttrain_helpers import tiny_model


def _trained_lora(model, **config):
    apply_lora(model, LoRAConfig(rank=4, alpha=8, **config))
    torch.manual_seed(1)
    with torch.no_grad():   # as if trained: B away from its zero start
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.05)
    return model


def test_only_adapters_train_and_training_starts_from_the_base():
    model = tiny_model()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, LoRAConfig(rank=4, targets=["wq", "wv", "w2"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert len(trainable) == 2 * 3 * model.config.n_layers
    with torch.no_grad():
        assert torch.equal(model(ids), before)


def test_adapters_off_is_the_base_model():
    """PPO's reference under LoRA: the policy with its adapters off computes the base's logits exactly."""
    model = tiny_model()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(ids)
        _trained_lora(model)
        adapted = model(ids)
        with adapters_off(model):
            assert torch.equal(model(ids), before)
        assert torch.equal(model(ids), adapted) and not torch.allclose(adapted, before)


def test_lora_on_a_bfloat16_model_trains_float32_adapters_and_merges_to_bfloat16():
    """A model loaded in bf16 (a GPU's default): the adapters stay float32 as peft keeps them, and the merged model
    computes in the model's dtype (float32 adapters had failed the forward on a dtype mismatch)."""
    model = tiny_model()
    for p in model.parameters():   # as herd.load(dtype=torch.bfloat16) builds it: the rotary table stays float32
        p.data = p.data.bfloat16()
    model = _trained_lora(model)
    ids = torch.randint(0, 1000, (2, 12))
    assert {p.dtype for p in lora_state_dict(model).values()} == {torch.float32}
    with torch.no_grad():
        adapted = model(ids)
        merged = merge_lora(model)
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        assert (merged(ids).float() - adapted.float()).abs().max() < 0.1 * adapted.float().abs().max()


@pytest.mark.heavy
def test_merged_lora_gives_the_adapted_logits_and_exports(tmp_path, chatml_format):
    tok = chatml_format.tokenizer
    model = _trained_lora(tiny_model(320))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        adapted = model(ids)
        assert len(lora_state_dict(model)) == 2 * 7 * model.config.n_layers
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert torch.allclose(merged(ids), adapted, atol=1e-5)
    save_checkpoint((merged.config, merged.state_dict(), tok), tmp_path / "meta", "meta")
    with torch.no_grad():
        loaded = herd.load(tmp_path / "meta", quantize=None).model(ids)
    assert torch.allclose(loaded, adapted, atol=1e-5)
    # ...and converted to Hugging Face's format (what `herd convert --format hf` runs), in transformers.
    convert(tmp_path / "meta", tmp_path / "hf", "hf")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, adapted, atol=1e-4)


def test_an_adapted_output_layer_of_a_tied_model_exports_exactly(tmp_path, chatml_format):
    """SmolLM2 and Llama 3.2 tie their output layer to the embeddings; an adapter on it unties them, and the merged
    model's config says so: a Hugging Face export had dropped lm_head for the embeddings."""
    tok = chatml_format.tokenizer
    model = _trained_lora(tiny_model(tok.vocab_size, tie_embeddings=True), targets=["wq", "output"])
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        adapted = model(ids)
    merge_lora(model)
    for fmt in ("hf", "meta"):
        save_checkpoint((model.config, model.state_dict(), tok), tmp_path / fmt, fmt)
        with torch.no_grad():
            assert torch.allclose(herd.load(tmp_path / fmt, quantize=None).model(ids), adapted, atol=1e-5), fmt
    assert not model.config.tie_embeddings
    untouched = merge_lora(_trained_lora(tiny_model(tok.vocab_size, tie_embeddings=True), targets=["wq"]))
    assert untouched.config.tie_embeddings and untouched.output.weight is untouched.tok_embeddings.weight


@pytest.mark.parametrize(("tied", "targets"), [(False, None), (True, ["wq", "wk", "w2", "output"])],
                         ids=["every-layer", "tied-output"])
def test_adapters_saved_for_peft_give_the_adapted_logits_on_the_hf_base(tmp_path, chatml_format, tied, targets):
    """The adapters alone, as torchtune and PEFT keep them: peft loads them onto the base in Hugging Face's format
    (its query and key rows in the other rotary order) and computes what herd's adapted model does. They had
    been merged into the model only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from herd.posttrain.lora import save_peft_adapter

    tok = chatml_format.tokenizer
    model = tiny_model(tok.vocab_size, tie_embeddings=tied)
    save_checkpoint((model.config, model.state_dict(), tok), tmp_path / "base", "hf")
    config = LoRAConfig(rank=4, alpha=8, **({"targets": targets} if targets else {}))
    model = _trained_lora(model, **({"targets": targets} if targets else {}))
    save_peft_adapter(model, config, tmp_path / "adapter", str(tmp_path / "base"))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        adapted = model(ids)
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert torch.allclose(peft(ids).logits, adapted, atol=1e-5)
    assert peft.peft_config["default"].r == 4 and peft.peft_config["default"].lora_alpha == 8


@pytest.mark.parametrize("base", ["int8", "int4"])
def test_qlora_gradients_flow_through_quantized_base_weights(base):
    """QLoRA's adapter gradients equal those of LoRA over the same, dequantized, float weights."""
    from herd.posttrain.lora import BASE_FORMATS

    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(64, 32, bias=False)]
    quantized = [BlockLinear(BASE_FORMATS[base](l.weight)) for l in linears]
    float_bases = []
    for q in quantized:
        layer = torch.nn.Linear(q.in_features, q.out_features, bias=False)
        from herd.posttrain.lora import dequantized_weight

        layer.weight.data.copy_(dequantized_weight(q))
        float_bases.append(layer)
    x = torch.randn(3, 5, 32)
    grads = []
    for bases in (quantized, float_bases):
        torch.manual_seed(2)
        first, second = (LoRALinear(b, rank=4, alpha=8) for b in bases)
        with torch.no_grad():
            first.lora_b.normal_()
            second.lora_b.normal_()
        second(torch.relu(first(x))).square().sum().backward()
        grads.append([first.lora_a.grad, first.lora_b.grad, second.lora_a.grad])
    tolerance = 1e-4   # 15 tokens: the block layer multiplies its stored weights with float activations
    for q, f in zip(*grads):
        assert (q - f).norm() <= tolerance * f.norm()


def test_qlora_on_the_model_trains_adapters_over_int8_layers():
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, quantize="int8"))
    assert isinstance(model.layers[0].attention.wq.base, BlockLinear)
    loss = model(torch.randint(0, 1000, (1, 8))).logsumexp(-1).sum()
    loss.backward()
    assert model.layers[0].feed_forward.w1.lora_b.grad.abs().sum() > 0   # A's gradient waits for B to move


def test_lora_rank_larger_than_the_width_is_refused():
    with pytest.raises(ValueError, match=r"LoRA rank 64 does not fit layers.0.attention.wk \(32 -> 16\)") as error:
        apply_lora(tiny_model(), LoRAConfig(rank=64, targets=["wk"]))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no linear layer is named"):
        apply_lora(tiny_model(), LoRAConfig(rank=2, targets=["q_proj"]))


def test_the_adapters_base_is_one_peft_can_find(tmp_path, monkeypatch):
    """"default" and a path relative to where the run started had been written as they were given: PEFT's
    AutoPeftModel looked "default" up on the hub and the relative path up from wherever it ran."""
    from herd.posttrain.lora import peft_base

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert peft_base("default") == peft_base("SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_base("base") == str(tmp_path.resolve() / "base")
    assert peft_base("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"
