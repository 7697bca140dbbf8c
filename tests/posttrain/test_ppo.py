"""Online PPO: rollouts from the generation engine, scored by a verifier, one iteration raises the expected score."""
from __future__ import annotations

import copy

import torch

from herd.generate.sampling import SamplingParams
from herd.posttrain.ppo import PPOConfig, ppo_update, reply_tokens, rollout_batch, rollout_targets, sample_rollouts
from herd.posttrain.logprobs import token_logps
from herd.posttrain.lora import LoRAConfig, apply_lora
from herd.posttrain.reward import RewardModel
from posttrain_helpers import tiny_model


def test_rollout_batch_labels_exactly_the_reply_tokens():
    batch = rollout_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert batch["tokens"].tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 1, 2, -100], [3, 4, 9, -100, -100]]


def test_one_ppo_iteration_raises_the_expected_score_of_a_verifiable_task(chatml_format):
    """Verifier: 1 if a reply starts with an even token id. Its expectation is exact (the policy's probability mass
    on even ids after the prompt), so the gain is measured without sampling noise."""
    tokenizer = chatml_format.tokenizer       # byte-level: a vocabulary the rollouts cover
    vocab = tokenizer.vocab_size
    policy, value_model = tiny_model(vocab, seed=0), RewardModel(tiny_model(vocab, seed=1))
    prompts = [[10 + i, 40 + i, 70 + i] for i in range(4)]

    def expected_score(policy) -> float:
        with torch.no_grad():
            logits = torch.stack([policy(torch.tensor([p]))[0, -1] for p in prompts])
        return float(torch.softmax(logits, -1)[:, 0::2].sum(-1).mean())

    torch.manual_seed(0)
    rows, done = sample_rollouts(policy, tokenizer, prompts, 8, SamplingParams(max_tokens=1, temperature=1.0,
                                                                               top_p=1.0))
    assert len(done) == 32 and all(rows[i] == prompts[i // 8] for i in range(32))
    replies = [reply_tokens(c) for c in done]
    scores = torch.tensor([float(r[0] % 2 == 0) for r in replies])
    batch = rollout_batch(rows, replies)
    with torch.no_grad():
        ref = token_logps(policy, batch)
    before = expected_score(policy)

    def updated(scores):
        tuned, values = copy.deepcopy(policy), copy.deepcopy(value_model)
        optimizer = torch.optim.SGD([*tuned.parameters(), *values.parameters()], lr=1.0)
        stats = ppo_update(tuned, values, batch, scores, ref, optimizer, PPOConfig(epochs=4, kl_coef=0.01))
        assert stats["kl"] == 0.0 and abs(stats["score"] - float(scores.mean())) < 1e-6
        return tuned

    tuned = updated(scores)
    assert expected_score(tuned) > before + 0.005, (before, expected_score(tuned))
    # The opposite verifier (odd ids) from the same rollouts moves the policy the other way.
    assert expected_score(updated(1 - scores)) < before


def test_rollouts_beyond_the_engine_queue_go_in_turns(chatml_format):
    """70 prompts x 16 samples: more sequences than the engine queues at once (1024), each reply with its prompt."""
    tokenizer = chatml_format.tokenizer
    prompts = [[10 + i % 50, 70 + i] for i in range(70)]
    rows, done = sample_rollouts(tiny_model(tokenizer.vocab_size), tokenizer, prompts, 16,
                                 SamplingParams(max_tokens=1, temperature=1.0, top_p=1.0))
    assert len(done) == 1120 and all(rows[i] == prompts[i // 16] == done[i].prompt_tokens for i in range(1120))


def test_targets_computed_in_chunks_equal_the_whole_batch():
    policy, value_model = tiny_model(64, seed=0), RewardModel(tiny_model(64, seed=1))
    batch = rollout_batch([[1, 2, 3], [4, 5], [6, 7, 8, 9], [1], [2, 2]], [[5, 6], [7], [8, 9, 10], [3, 3, 3], [4]])
    scores, ref = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5]), torch.zeros(batch["tokens"].shape)
    whole = rollout_targets(policy, value_model, batch, scores, ref, PPOConfig())
    chunked = rollout_targets(policy, value_model, batch, scores, ref, PPOConfig(), rows=2)
    assert whole.keys() == chunked.keys()
    assert all(torch.allclose(whole[k].float(), chunked[k].float(), atol=1e-6) for k in whole)


def test_targets_are_those_of_the_sampling_policy_not_of_a_dropout_draw():
    """The Trainer holds the models in train mode; the old log-probs and values are those of the policy that
    sampled (eval mode, as the engine runs it), not of a random LoRA dropout mask, and the modes are kept."""
    policy, value_model = tiny_model(64, seed=0), RewardModel(tiny_model(64, seed=1))
    for model in (policy, value_model.body):
        apply_lora(model, LoRAConfig(rank=4, dropout=0.5, targets=["wq", "wv", "w2"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):   # as if trained: adapters that dropout changes
                    p.normal_(std=0.5)
    batch = rollout_batch([[1, 2, 3], [4, 5]], [[5, 6, 7, 8], [9, 10, 11]])
    with torch.no_grad():
        sampled, values = token_logps(policy.eval(), batch), value_model.eval().per_token(batch["tokens"])
    policy.train()
    value_model.train()
    targets = rollout_targets(policy, value_model, batch, torch.zeros(2), torch.zeros(batch["tokens"].shape),
                              PPOConfig())
    mask = batch["labels"] != -100
    assert torch.allclose(targets["old_logps"], sampled * mask) and torch.allclose(targets["old_values"], values * mask)
    assert policy.training and value_model.training
