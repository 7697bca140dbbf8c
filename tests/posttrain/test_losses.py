"""Recipe losses against independent references: TRL's trainers on the same batch, and hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from herd.checkpoint import save_checkpoint
from herd.posttrain.data import DialogEncoder, encode_preferences, preference_batch
from herd.posttrain.dpo import DPOConfig, dpo_loss, reference_logps
from herd.posttrain.kd import KDConfig, kd_loss
from herd.posttrain.ppo import PPOConfig, gae, ppo_token_losses, token_rewards
from herd.posttrain.reward import RewardModel, reward_loss
from posttrain_helpers import tiny_model

ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4", "rejected": "It is five, I think.",
     "edited": "2+2 = 4"},
    {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": "Paris.", "rejected": "Lyon", "edited": "Paris"},
]
VOCAB = 320
PAD = 258  # <|endoftext|>: Hugging Face's sequence classifier scores the last token before the first pad


@pytest.fixture(scope="module")
def pairs(chatml_format):
    encoder = DialogEncoder(chatml_format)
    rows = [{k: v for k, v in r.items() if k != "edited"} for r in ROWS]
    return encode_preferences([(str(i), r) for i, r in enumerate(rows)], encoder, max_len=128)


@pytest.fixture(scope="module")
def triples(chatml_format):
    return encode_preferences([(str(i), r) for i, r in enumerate(ROWS)], DialogEncoder(chatml_format), max_len=128)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, chatml_format):
    """Policy (seed 1) and reference (seed 0) tiny models, also written as Hugging Face checkpoints."""
    models, dirs = {}, {}
    for name, seed in (("policy", 1), ("reference", 0)):
        models[name] = tiny_model(VOCAB, seed=seed)
        dirs[name] = tmp_path_factory.mktemp(name)
        save_checkpoint((models[name].config, models[name].state_dict(), chatml_format.tokenizer), dirs[name], "hf")
    return models, dirs


def _trl_preference_inputs(examples, ranks=(0, 1), pad_id=0):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    better, worse = ranks
    return DataCollatorForPreference(pad_token_id=pad_id)([
        {"prompt_ids": e.prompt, "chosen_ids": e.replies[better], "rejected_ids": e.replies[worse]} for e in examples])


@pytest.mark.heavy
def test_dpo_loss_equals_trl_with_llama3_changes_off(hf_dirs, pairs, chatml_format, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    models, dirs = hf_dirs
    policy = AutoModelForCausalLM.from_pretrained(dirs["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(dirs["reference"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(dirs["policy"])
    tokenizer.pad_token = "<|endoftext|>"
    trainer = DPOTrainer(model=policy, ref_model=reference, processing_class=tokenizer,
                         args=TRLConfig(output_dir=str(tmp_path), beta=0.3, report_to="none", use_cpu=True, bf16=False),
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    expected = trainer.compute_loss(policy, _trl_preference_inputs(pairs))

    batch = preference_batch(pairs, mask_formatting=False)
    batch["ref_logps"] = reference_logps(models["reference"], batch)
    loss, n = dpo_loss(models["policy"], batch, DPOConfig(beta=0.3, nll_weight=0.0, mask_formatting=False))
    assert int(n) == 2 and float(expected) != pytest.approx(math.log(2), abs=1e-3)
    assert float(loss / n) == pytest.approx(float(expected), rel=1e-5)
    # The same gradient too: the loss is built from the same quantities, not just equal in value.
    expected.backward()
    (loss / n).backward()
    ours = models["policy"].layers[0].attention.wv.weight.grad
    theirs = policy.model.layers[0].self_attn.v_proj.weight.grad
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-4)


def test_llama3_dpo_masks_formatting_and_adds_chosen_nll(hf_dirs, pairs):
    models, _ = hf_dirs
    policy, reference = models["policy"], models["reference"]
    config = DPOConfig(beta=0.1, nll_weight=0.2, mask_formatting=True)
    batch = preference_batch(pairs, mask_formatting=True)
    batch["ref_logps"] = reference_logps(reference, batch)
    with torch.no_grad():
        loss, n = dpo_loss(policy, batch, config)

    def reply_logp(model, prompt, reply):
        """Summed log-prob of the reply's ids that are not special tokens, from full logits."""
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logp = F.log_softmax(model(ids)[0], -1)
        picked = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(reply) if t < 256]  # bytes only
        return sum(picked), len(picked)

    expected = 0.0
    for e in pairs:
        (pc, nc), (pr, _) = (reply_logp(policy, e.prompt, r) for r in e.replies)
        (rc, _), (rr, _) = (reply_logp(reference, e.prompt, r) for r in e.replies)
        margin = (pc - rc) - (pr - rr)
        expected += math.log1p(math.exp(-0.1 * margin)) + 0.2 * (-pc / nc)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # The end-of-turn token really was left out: scoring it too changes the value.
    batch_all = preference_batch(pairs, mask_formatting=False)
    batch_all["ref_logps"] = reference_logps(reference, batch_all)
    with torch.no_grad():
        assert float(dpo_loss(policy, batch_all, config)[0]) != pytest.approx(expected, rel=1e-3)


def _rm_pair(hf_dirs):
    from transformers import AutoModelForSequenceClassification

    models, dirs = hf_dirs
    ours = RewardModel(tiny_model(VOCAB, seed=1))
    theirs = AutoModelForSequenceClassification.from_pretrained(dirs["policy"], num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        theirs.score.weight.copy_(ours.head.weight)
    return ours, theirs


def _trl_reward_loss(trainer, model, examples, better, worse):
    inputs = _trl_preference_inputs(examples, (better, worse), pad_id=PAD)
    return trainer.compute_loss(model, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})


def test_reward_loss_equals_trl_for_pairs_and_ranked_triples(hf_dirs, pairs, triples, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    ours, theirs = _rm_pair(hf_dirs)
    tokenizer = AutoTokenizer.from_pretrained(hf_dirs[1]["policy"])
    tokenizer.pad_token = "<|endoftext|>"
    trainer = RewardTrainer(model=theirs, processing_class=tokenizer,
                            args=RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                                              center_rewards_coefficient=None),
                            train_dataset=Dataset.from_list([{"chosen": "b", "rejected": "c"}]))
    with torch.no_grad():
        assert theirs.config.pad_token_id == PAD
        loss, n = reward_loss(ours, preference_batch(pairs, mask_formatting=False, pad_id=PAD))
        expected = _trl_reward_loss(trainer, theirs, pairs, 0, 1)
        assert float(loss / n) == pytest.approx(float(expected), rel=1e-5)
        # edited > chosen > rejected: the mean over its three ordered pairs, each as TRL scores a pair.
        loss, n = reward_loss(ours, preference_batch(triples, mask_formatting=False, pad_id=PAD))
        expected = sum(float(_trl_reward_loss(trainer, theirs, triples, a, b)) for a, b in ((0, 1), (0, 2), (1, 2)))
        assert float(loss / n) == pytest.approx(expected / 3, rel=1e-5)


def test_kd_loss_is_forward_kl_at_temperature_plus_cross_entropy(hf_dirs, pairs):
    models, _ = hf_dirs
    student, teacher = models["policy"], models["reference"]
    batch = preference_batch(pairs, mask_formatting=False)
    config = KDConfig(temperature=2.0, kd_weight=0.7)
    with torch.no_grad():
        loss, n = kd_loss(student, batch, teacher, config)
        s_logits, t_logits = student(batch["tokens"]), teacher(batch["tokens"])
    expected, count = 0.0, 0
    for row, labels in enumerate(batch["labels"].tolist()):
        for pos, label in enumerate(labels):
            if label < 0:
                continue
            p = torch.softmax(t_logits[row, pos].double() / 2, -1)
            q = torch.softmax(s_logits[row, pos].double() / 2, -1)
            kl = float((p * (p.log() - q.log())).sum()) * 4
            ce = -float(torch.log_softmax(s_logits[row, pos].double(), -1)[label])
            expected += 0.7 * kl + 0.3 * ce
            count += 1
    assert int(n) == count and float(loss) == pytest.approx(expected, rel=1e-4)


def test_gae_matches_the_direct_sum_and_ppo_clips():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        T = int(mask[b].sum())
        v = values[b, :T].tolist() + [0.0]
        deltas = [rewards[b, t] + gamma * v[t + 1] - v[t] for t in range(T)]
        for t in range(T):
            direct = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, T))
            assert float(advantages[b, t]) == pytest.approx(float(direct), abs=1e-5)
            assert float(returns[b, t]) == pytest.approx(float(direct) + v[t], abs=1e-5)
        assert not advantages[b, T:].any()
    # Rewards: the KL penalty on every reply token, the score added on the last one.
    scores = torch.tensor([1.0, -2.0, 0.5])
    old, ref = torch.randn(3, 6), torch.randn(3, 6)
    r = token_rewards(scores, old, ref, mask, kl_coef=0.1)
    assert float(r[1, 3]) == pytest.approx(float(-0.1 * (old[1, 3] - ref[1, 3]) + scores[1]), abs=1e-6)
    assert float(r[1, 4]) == 0.0 and float(r[0, 2]) == pytest.approx(float(-0.1 * (old[0, 2] - ref[0, 2])), abs=1e-6)
    # A ratio beyond 1 + clip earns nothing more on a positive advantage; the pessimistic bound is kept.
    config = PPOConfig(clip=0.2)
    adv = torch.tensor([1.0, 1.0, -1.0])
    logps = torch.log(torch.tensor([1.5, 1.1, 0.5]))
    policy, _ = ppo_token_losses(logps, torch.zeros(3), adv, torch.zeros(3), torch.zeros(3), torch.zeros(3), config)
    assert policy.tolist() == pytest.approx([-1.2, -1.1, 0.8])


def test_rows_with_and_without_an_edited_reply_train_in_one_file(hf_dirs, pairs, triples, tmp_path):
    """Llama 3's preference data has an edited reply on some rows only: a batch cannot mix the two kinds, so each
    micro-batch is of one kind, and the losses (sums over examples) are those of the examples one at a time. Such a
    file had stopped training at the first batch that drew both (and DPO's reference log-probs at once)."""
    from herd.posttrain.finetune import _preference_collate, _ranked, cached_reference_logps, micro_batches

    policy, reference = hf_dirs[0]["policy"], hf_dirs[0]["reference"]
    examples = [pairs[0], triples[1], pairs[1], triples[0]]
    refs = cached_reference_logps(reference, examples, False, PAD, tmp_path / "refs.pt")
    for e, ref in zip(examples, refs):
        alone = reference_logps(reference, preference_batch([e], mask_formatting=False, pad_id=PAD))
        assert ref.shape == (len(e.replies),) and torch.allclose(ref, alone, atol=1e-5)
    items = list(zip(examples, refs))
    collate = lambda part: _preference_collate(part, mask_formatting=False, pad_id=PAD)  # noqa: E731
    batches = micro_batches(items, 3, collate, _ranked)
    assert [int(b["n"]) for b in batches] == [2, 2]
    config = DPOConfig(beta=0.2, nll_weight=0.3)
    together = sum(dpo_loss(policy, b, config)[0] for b in batches)
    alone = sum(dpo_loss(policy, collate([item]), config)[0] for item in items)
    assert torch.allclose(together, alone, atol=1e-5)
    rm = RewardModel(reference)
    assert torch.allclose(sum(reward_loss(rm, b)[0] for b in micro_batches(items, 3, collate, _ranked)),
                          sum(reward_loss(rm, collate([item]))[0] for item in items), atol=1e-5)


@pytest.mark.parametrize("recipe", ["dpo", "rm"])
def test_preference_losses_count_on_the_losss_device(pairs, recipe):
    """Their count had been made on the default device, the CPU: evaluating on a GPU stacked it with the loss
    there and failed. A default device that is not the model's shows the same without a GPU."""
    batch = preference_batch(pairs, mask_formatting=False)
    if recipe == "dpo":
        model, config = tiny_model(), DPOConfig()
        batch["ref_logps"] = reference_logps(model, batch)
        losses = lambda: dpo_loss(model, batch, config)  # noqa: E731
    else:
        model = RewardModel(tiny_model())
        losses = lambda: reward_loss(model, batch)  # noqa: E731
    with torch.no_grad(), torch.device("meta"):
        loss, n = losses()
    assert n.device == loss.device and int(n) == len(pairs)
    assert torch.stack([loss.float(), n.float()]).shape == (2,)  # as Trainer.evaluate sums them
