"""Our model on checkpoint weights gives transformers' logits: the test that the name maps, the q/k permutation,
the rope scaling and the tie are all right, for HF files and for the same weights written in Meta's format."""
from __future__ import annotations

import pytest
import torch

from ckpt_helpers import LLAMA3_ROPE

from herd.checkpoint import build_model, load_checkpoint, save_checkpoint

# Past Llama 3.1's original 8192 positions, where the scaled frequencies matter.
POSITIONS = torch.arange(9000, 9016).expand(2, 16)


def assert_same_logits(reference, ckpt, tokens, positions=POSITIONS):
    model = build_model(ckpt)
    with torch.no_grad():
        ours = model(tokens, positions=positions)
        theirs = reference(tokens, position_ids=positions).logits
    err = (ours - theirs).abs().max().item()
    assert err < 1e-4, f"max abs logit error {err}"
    return err


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("via", ["hf", "meta", "meta-2-shards"])
def test_logits_match_transformers(make_hf, tmp_path, tied, via):
    reference, directory = make_hf(tied=tied)
    if via != "hf":
        shards = 2 if via == "meta-2-shards" else 1
        directory = save_checkpoint(load_checkpoint(directory), tmp_path / "meta", "meta", shards=shards)
        assert len(list(directory.glob("consolidated.*.pth"))) == shards
    ckpt = load_checkpoint(directory)
    assert ckpt.format == ("hf" if via == "hf" else "meta")
    assert ckpt.config.tie_embeddings == tied
    assert ckpt.config.rope_scaling is not None and ckpt.config.rope_scaling.factor == 8.0
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert_same_logits(reference, ckpt, tokens)


def test_swish_is_silu_and_other_activations_are_refused(make_hf):
    """transformers' ACT2FN maps "swish" to the same SiLU; it had been refused as not Llama's activation."""
    from herd.checkpoint.errors import CheckpointError

    reference, directory = make_hf(hidden_act="swish")
    assert_same_logits(reference, load_checkpoint(directory), torch.randint(0, 256, (2, 16)))
    _, directory = make_hf(hidden_act="gelu")
    with pytest.raises(CheckpointError, match="hidden_act is 'gelu'; Llama uses silu"):
        load_checkpoint(directory)


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE | {"factor": 32.0}], ids=["no-scaling", "factor-32"])
def test_logits_match_for_other_rope_settings_through_meta(make_hf, tmp_path, rope):
    """Llama 3.2's HF configs say factor 32, which Meta's params.json cannot say by itself: it must survive."""
    reference, directory = make_hf(rope=rope)
    meta = save_checkpoint(load_checkpoint(directory), tmp_path / "meta", "meta")
    ckpt = load_checkpoint(meta)
    assert ckpt.config.rope_scaling == load_checkpoint(directory).config.rope_scaling
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    assert_same_logits(reference, ckpt, tokens)


def as_meta_fp8(reference, directory, keep=("model.layers.0.self_attn.",)):
    """Rewrite `directory` as Meta's FP8 release of Llama 3.1 lays it out (quant_method fbgemm_fp8): every linear
    but those under `keep` as e4m3 codes with a float32 `weight_scale` of one per row ([N, 1]), a row's largest
    weight at 448. `reference` takes the weights the codes stand for. Returns {HF name: codes}."""
    import json

    from safetensors.torch import save_file

    tensors, codes = {}, {}
    with torch.no_grad():
        for name, weight in reference.state_dict().items():
            if not name.endswith("_proj.weight") or name.startswith(keep):
                tensors[name] = weight.contiguous()
                continue
            scale = weight.abs().amax(dim=1, keepdim=True) / 448
            codes[name] = (weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale"] = codes[name], scale
            weight.copy_(codes[name].float() * scale)
    for stale in directory.glob("model*.safetensors*"):
        stale.unlink()
    save_file(tensors, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                     "modules_to_not_convert": [k.rstrip(".") for k in keep]}
    (directory / "config.json").write_text(json.dumps(config))
    return codes


def test_meta_fp8_weights_load(make_hf):
    from herd.checkpoint.hf import meta_name, to_meta_rows
    from herd.quant.fp8 import FP8Linear
    from herd.quant.load import build_quantized

    reference, directory = make_hf()
    codes = as_meta_fp8(reference, directory)
    ckpt = load_checkpoint(directory)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    assert_same_logits(reference, ckpt, tokens)
    # Quantized again as FP8, each layer gets back the codes it was stored with.
    model = build_quantized(load_checkpoint(directory), "fp8", "cpu")
    modules = dict(model.named_modules())
    for name, stored in codes.items():
        target = meta_name(name).removesuffix(".weight")
        heads = {"wq": 4, "wk": 2}.get(target.rsplit(".", 1)[1])
        expected = stored.float() if heads is None else to_meta_rows(stored.float(), heads)
        assert isinstance(modules[target], FP8Linear) and torch.equal(modules[target].codes.float(), expected), name
    # The layers the release left in bf16 stay as published, as transformers' FbgemmFp8 and vLLM keep them (they
    # had been rounded to FP8 too).
    kept = [n for n, m in modules.items() if n.startswith("layers.0.attention.w") or n == "output"]
    assert len(kept) == 5 and not any(isinstance(modules[n], FP8Linear) for n in kept)
    assert torch.equal(modules["layers.0.attention.wq"].weight, ckpt.state_dict["layers.0.attention.wq.weight"])
    # The same given as a Scheme, which `herd quantize` passes (it had rounded those layers to FP8 too)
    from herd.quant.schemes import Scheme

    stored = dict(build_quantized(load_checkpoint(directory), Scheme.parse("fp8"), "cpu").named_modules())
    assert {n for n, m in stored.items() if isinstance(m, FP8Linear)} == {
        n for n, m in modules.items() if isinstance(m, FP8Linear)}


def test_other_quantized_checkpoints_are_refused_by_name(make_hf):
    import json

    from herd.checkpoint import CheckpointError

    _, directory = make_hf()
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized with 'gptq'"):
        load_checkpoint(directory)
