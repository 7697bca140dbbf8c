"""Packing with the document mask, the data order across ranks and resumes, and the learning-rate schedule."""
import numpy as np
import pytest
import torch
from train_helpers import write_shards

from herd.data.shards import ByteTokenizer, TokenShards
from herd.train.config import TrainingSection
from herd.train.data import IGNORE, PackedBatches, split_documents
from herd.train.optim import clip_grad_norm, lr_factor


def test_windows_follow_the_shuffled_documents_and_mask_their_boundaries(byte_shards):
    shards = TokenShards(byte_shards)
    cfg = TrainingSection(batch_size=4, seq_len=32, steps=10)
    batches = PackedBatches(shards, cfg, held_out=0.05)
    train, held = split_documents(shards, 0.05, cfg.seed)
    assert len(held) and not set(train) & set(held)
    # The stream is the training documents in a permutation; rebuild it and check every window against it.
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(train))
    stream = np.concatenate([shards[int(train[i])] for i in order]).astype(np.int64)
    doc_of = np.concatenate([np.full(len(shards[int(train[i])]), k) for k, i in enumerate(order)])
    for step in range(3):
        (batch,) = next(batches)
        for row in range(4):
            start = (step * 4 + row) * 32
            assert batch["tokens"][row].tolist() == stream[start:start + 32].tolist()
            same = doc_of[start + 1:start + 33] == doc_of[start:start + 32]
            expected = np.where(same, stream[start + 1:start + 33], IGNORE)
            assert batch["labels"][row].tolist() == expected.tolist()
            docs = batch["document_ids"][row].numpy()
            assert ((docs[1:] != docs[:-1]) == (doc_of[start + 1:start + 32] != doc_of[start:start + 31])).all()
    # A label is ignored exactly where the next token opens another document (its BOS).
    assert (batch["labels"] == IGNORE).any()
    assert (batch["tokens"][batch["labels"] == IGNORE] == 257).all()  # the byte tokenizer's EOS precedes it


def test_the_copies_of_a_document_fall_on_one_side_of_the_held_out_split(tmp_path):
    """The data mix writes a repeated document once per copy, the copies an epoch apart: drawn entry by entry, a
    third to half of the held-out set had been copies of training documents (a held-out loss read too low)."""
    from herd.data.shards import ShardConfig, ShardWriter

    writer = ShardWriter(tmp_path, ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"), ByteTokenizer())
    copies = [3 if i % 3 == 0 else 1 for i in range(300)]
    for p in range(3):   # copy p of every repeated document before copy p + 1 of any, as the mix writes them
        for i, n in enumerate(copies):
            if p < n:
                writer.add(f"doc-{i}", np.arange(5 + i % 7, dtype=np.uint32))
    writer.close()
    shards = TokenShards(tmp_path)
    assert len(shards) == sum(copies)
    # No held-out set: every entry trains, and no document id is read (a corpus's worth per rank).
    unread = type("Unread", (), {"__len__": lambda self: len(shards), "doc_id": lambda self, i: 1 / 0})()
    train, held = split_documents(unread, 0.0, 0)
    assert train.tolist() == list(range(len(shards))) and not len(held)
    for seed in range(5):
        train, held = split_documents(shards, 0.1, seed)
        assert len(train) + len(held) == len(shards) and len(held)
        assert not {shards.doc_id(int(i)) for i in train} & {shards.doc_id(int(i)) for i in held}


def test_ranks_split_the_global_batch_and_resume_exactly(byte_shards):
    shards = TokenShards(byte_shards)
    cfg = TrainingSection(batch_size=4, seq_len=16, micro_batch_size=1, steps=10,
                          batch_size_schedule=[[2, 8]], seq_len_schedule=[[3, 24]])
    whole = PackedBatches(shards, cfg)
    ranks = [PackedBatches(shards, cfg, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(5):
        glob = torch.cat([mb["tokens"] for mb in next(whole)])
        parts = [torch.cat([mb["tokens"] for mb in next(r)]) for r in ranks]
        assert torch.equal(glob, torch.cat(parts))
        assert glob.shape == (8 if step >= 2 else 4, 24 if step >= 3 else 16)
    state = whole.state_dict()
    expected = next(whole)
    resumed = PackedBatches(shards, cfg)
    resumed.load_state_dict(state)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(next(resumed), expected))
    with pytest.raises(ValueError, match="does not split over 3"):
        PackedBatches(shards, cfg, dp_size=3)


def test_a_position_is_not_resumed_into_another_stream(byte_shards):
    """The position is an offset into one stream: resumed with another seed or held-out share it had re-read
    hundreds of tokens, skipped as many and trained on held-out documents, without a word."""
    from herd.train.config import ConfigError

    shards = TokenShards(byte_shards)
    cfg = TrainingSection(batch_size=4, seq_len=16, steps=10)
    saved = PackedBatches(shards, cfg, held_out=0.1)
    next(saved)
    state = saved.state_dict()
    same = PackedBatches(shards, cfg, held_out=0.1)
    same.load_state_dict(state)
    assert same.offsets == saved.offsets
    with pytest.raises(ConfigError, match=r"training.seed: 0 then, 1 now\); resume with the checkpoint's"):
        PackedBatches(shards, TrainingSection(batch_size=4, seq_len=16, steps=10, seed=1), held_out=0.1
                      ).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"data.held_out: 0.1 then, 0.2 now"):
        PackedBatches(shards, cfg, held_out=0.2).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"data.anneal_shards: none then, 600 documents of [\d,]+ tokens now"):
        PackedBatches(shards, cfg, held_out=0.1, anneal=shards).load_state_dict(state)


def test_an_anneal_set_from_the_same_corpus_keeps_the_held_out_documents_out(byte_shards, tmp_path):

    shards = TokenShards(byte_shards)
    cfg = TrainingSection(batch_size=4, seq_len=16, steps=10)
    _, held = split_documents(shards, 0.1, cfg.seed)
    anneal = PackedBatches(shards, cfg, held_out=0.1, anneal=shards).streams["anneal"]
    assert len(held) and not set(anneal.docs.tolist()) & set(held.tolist())
    assert len(anneal.docs) + len(held) == len(shards)
    other = TokenShards(write_shards(tmp_path / "other", [f"Another text, number {i}." for i in range(50)]))
    assert other.doc_id(0) == shards.doc_id(0)  # the same ids, other documents: every one anneals
    assert len(PackedBatches(shards, cfg, held_out=0.1, anneal=other).streams["anneal"].docs) == 50


def test_an_anneal_set_keeps_every_held_out_document_out_when_ids_repeat(tmp_path):
    """Two shards of one dataset both number from 0: held-out documents had been looked up by id alone, the last of
    each id standing for all, so the others with that id were compared with it, found different, and annealed on."""
    from herd.data.shards import ShardConfig, ShardWriter, encode_document

    cfg = ShardConfig(tokenizer="herd.data.shards:ByteTokenizer")
    writer = ShardWriter(tmp_path, cfg, ByteTokenizer())
    for part in ("first", "second"):
        for i in range(40):
            writer.add(str(i), encode_document(ByteTokenizer(), f"The {part} shard's text number {i}.", cfg))
    writer.close()
    shards = TokenShards(tmp_path)
    train = TrainingSection(batch_size=4, seq_len=16, steps=10)
    for held_out in (0.1, 0.3):
        _, held = split_documents(shards, held_out, train.seed)
        held_texts = {shards[int(i)].tobytes() for i in held}
        anneal = PackedBatches(shards, train, held_out=held_out, anneal=shards).streams["anneal"]
        assert len(held) and not {shards[int(i)].tobytes() for i in anneal.docs} & held_texts
        assert len(anneal.docs) + len(held) == len(shards)


def test_a_token_past_the_vocabulary_is_named_with_its_document(tmp_path):
    from herd.data.shards import ShardConfig, ShardWriter
    from herd.train.config import ConfigError

    writer = ShardWriter(tmp_path, ShardConfig(tokenizer="herd.data.shards:ByteTokenizer"), ByteTokenizer())
    for i in range(8):
        writer.add(f"doc-{i}", np.array([256, 65, 300 if i == 5 else 66, 257], dtype=np.uint32))
    writer.close()
    batches = PackedBatches(TokenShards(tmp_path), TrainingSection(batch_size=2, seq_len=4, steps=10))
    with pytest.raises(ConfigError, match="document 'doc-5' holds token id 300, past its tokenizer's 258"):
        for _ in range(4):
            next(batches)


def test_learning_rate_warms_up_decays_and_anneals_to_zero():
    cfg = TrainingSection(steps=100, warmup_steps=10, min_lr_ratio=0.1, anneal_steps=20)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # never rises after warm-up
    assert f[79] > 0.1 and f[80] == pytest.approx(f[79], rel=0.05)  # the anneal starts where cosine was
    assert f[99] == pytest.approx(f[80] / 20, rel=1e-6)  # and ends one step short of zero
    plain = TrainingSection(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(99, plain) == pytest.approx(0.1, rel=1e-2)


def test_the_decay_between_warm_up_and_anneal_is_pytorch_s_cosine():
    """Against torch's CosineAnnealingLR from the end of the warm-up (the endpoints alone had let any falling
    curve pass)."""
    cfg = TrainingSection(steps=100, warmup_steps=10, min_lr_ratio=0.1, anneal_steps=20, lr=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100 - 20 - 10, eta_min=0.1)
    for step in range(10, 80):
        assert lr_factor(step, cfg) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        optimizer.step()
        cosine.step()


def test_weight_decay_shrinks_matrices_and_leaves_norms_gains():
    """AdamW's decoupled decay (w -= lr * wd * w) on every matrix, none on the RMSNorm gains."""
    from herd.model import ModelConfig, Transformer
    from herd.train.optim import build_optimizer

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=64))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, TrainingSection(lr=0.5, weight_decay=0.1))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: the decay alone moves a weight
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.5 * 0.1) if p.ndim >= 2 else before[name]
        assert torch.allclose(p.detach(), expected, atol=1e-7), name
    assert any(p.ndim == 1 for p in model.parameters())  # the norms' gains were among them


def test_clipping_scales_to_the_max_norm():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm(params, 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(1.0, rel=1e-5)
