"""Judge scoring and semantic de-duplication."""
from __future__ import annotations

import math

import pytest
import torch

from herd.posttrain.curate import GRADES, QUALITY, embed, grade, semantic_dedup, topic
from herd.llm import LLM
from posttrain_helpers import tiny_model


class FixedJudge:
    """A judge whose label log-likelihoods are given, recording what it was asked."""

    def __init__(self, scores):
        self.scores, self.asked = scores, []

    def choose(self, messages, choices):
        self.asked.append((messages, choices))
        return {c: self.scores[c] for c in choices}


def test_grade_is_the_expected_grade_under_the_judges_likelihoods():
    logp = {"1": -3.0, "2": -2.0, "3": -1.0, "4": -0.5, "5": -4.0}
    judge = FixedJudge(logp)
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    z = sum(math.exp(v) for v in logp.values())
    expected = sum(int(g) * math.exp(logp[g]) / z for g in GRADES)
    assert grade(judge, QUALITY, dialog) == pytest.approx(expected)
    [(messages, choices)] = judge.asked
    assert choices == list(GRADES) and "ASSISTANT: Hello!" in messages[0]["content"]
    assert topic(FixedJudge({"math": -2.0, "code": -0.1}), dialog, ["math", "code"]) == "code"


def test_dedup_keeps_the_best_scored_of_near_identical_examples():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    near = torch.nn.functional.normalize(base[1] + 0.01 * torch.randn(16), dim=-1)
    embeddings = torch.cat([base, near[None], base[3:4]])   # 4 ~ 1, 5 == 3
    scores = [1.0, 2.0, 1.0, 5.0, 3.0, 1.0]
    assert semantic_dedup(embeddings, scores, threshold=0.95) == [0, 2, 3, 4]
    assert semantic_dedup(embeddings, scores, threshold=1.0 + 1e-6) == [0, 1, 2, 3, 4, 5]
    assert semantic_dedup(embeddings, scores, threshold=0.95, n_clusters=3) == [0, 2, 3, 4]


def test_dedup_and_clusters_equal_their_definitions_on_random_data():
    """Against the greedy rule written plainly (every kept vector compared, best score first) and Lloyd's step
    written per cluster, on 300 vectors with planted near-copies."""
    from herd.posttrain.curate import spherical_kmeans

    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(150, 16), dim=-1)
    x = torch.nn.functional.normalize(torch.cat([base, base + 0.05 * torch.randn(150, 16)]), dim=-1)
    scores = torch.rand(300).tolist()
    kept = []
    for i in sorted(range(300), key=lambda i: -scores[i]):
        if all(float(x[j] @ x[i]) <= 0.95 for j in kept):
            kept.append(i)
    assert semantic_dedup(x, scores, threshold=0.95) == sorted(kept)
    labels = spherical_kmeans(x, 5, seed=1, iterations=1)
    centers = x[torch.randperm(300, generator=torch.Generator().manual_seed(1))[:5]]
    first = (x @ centers.T).argmax(-1)
    moved = torch.stack([torch.nn.functional.normalize(x[first == c].mean(0), dim=-1) if (first == c).any()
                         else centers[c] for c in range(5)])
    assert labels == first.tolist() and spherical_kmeans(x, 5, seed=1, iterations=2) == (x @ moved.T).argmax(
        -1).tolist()


def test_embeddings_are_unit_mean_pooled_and_ignore_padding(llama3_format):
    llm = LLM(tiny_model().eval(), llama3_format.tokenizer, llama3_format)
    texts = ["short", "a much longer text than the first one", "short"]
    vectors = embed(llm, texts, batch_size=2)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    alone = embed(llm, ["short"])
    assert torch.allclose(vectors[0], alone[0], atol=1e-5) and torch.allclose(vectors[2], alone[0], atol=1e-5)
