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


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE | {"factor": 32.0}], ids=["no-scaling", "factor-32"])
def test_logits_match_for_other_rope_settings_through_meta(make_hf, tmp_path, rope):
    """Llama 3.2's HF configs say factor 32, which Meta's params.json cannot say by itself: it must survive."""
    reference, directory = make_hf(rope=rope)
    meta = save_checkpoint(load_checkpoint(directory), tmp_path / "meta", "meta")
    ckpt = load_checkpoint(meta)
    assert ckpt.config.rope_scaling == load_checkpoint(directory).config.rope_scaling
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    assert_same_logits(reference, ckpt, tokens)
