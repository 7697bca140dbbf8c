"""The chunked output-layer cross-entropy against PyTorch's plain one: the same loss and gradients."""
import pytest
import torch
import torch.nn.functional as F

import herd.train.fused_loss as fused
from herd.model import ModelConfig, Transformer
from herd.train.loop import causal_lm_loss


@pytest.mark.parametrize("chunk", [1 << 23, 7 * 50])  # one chunk; several, the last one short
def test_loss_and_gradients_equal_the_plain_computation(monkeypatch, chunk):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    (fused.linear_cross_entropy(h, w, labels) * 0.3).backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    loss = F.cross_entropy(h @ w.T, labels, ignore_index=-100, reduction="sum")
    (loss * 0.3).backward()
    assert float(fused.linear_cross_entropy(h, w, labels)) == pytest.approx(float(loss), rel=1e-6)
    torch.testing.assert_close(got[0], h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_the_trainers_loss_equals_cross_entropy_over_the_models_logits(tied):
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=64,
                         max_seq_len=64, tie_embeddings=tied)
    torch.manual_seed(1)
    model = Transformer(config)
    tokens = torch.randint(0, 96, (2, 20))
    batch = {"tokens": tokens, "labels": torch.where(tokens % 7 == 0, -100, tokens.roll(-1, 1)),
             "document_ids": (torch.arange(20) >= 9).long().expand(2, 20)}
    loss, n = causal_lm_loss(model, batch)
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = model(tokens, document_ids=batch["document_ids"])
    plain = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    plain.backward()
    assert float(loss) == pytest.approx(float(plain), rel=1e-6) and int(n) == int((batch["labels"] != -100).sum())
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6)


def test_a_target_far_below_the_others_gets_its_exact_loss():
    """p(target) underflows float32 when its logit is ~100 below the top one: the loss must not saturate."""
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    w = torch.tensor([[150.0, 0.0], [-150.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([1, 2])
    plain = F.cross_entropy(h @ w.T, labels, reduction="sum")
    got = fused.linear_cross_entropy(h, w, labels)
    assert float(plain) > 300 and float(got) == pytest.approx(float(plain), rel=1e-6)


def test_no_labelled_row_gives_zero_loss_and_zero_gradients():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    fused.linear_cross_entropy(h, w, torch.full((4,), -100)).backward()
    assert float(h.grad.abs().sum()) == 0 and float(w.grad.abs().sum()) == 0


def test_a_second_backward_through_it_is_refused():
    h = torch.randn(4, 8, requires_grad=True)
    loss = fused.linear_cross_entropy(h, torch.randn(10, 8), torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
