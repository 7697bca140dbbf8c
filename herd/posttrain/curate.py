"""Data processing as Llama 3 did it for SFT and preference data: a judge scores, near-duplicates go.

- Topic, quality and difficulty come from a judge model (any `herd.load` model) through `LLM.choose`: the judge is
  asked a question whose answer is a label, and the likelihood of each label is read instead of a generated reply,
  so a small judge cannot ramble. A graded score is the expected grade under those likelihoods.
- Semantic de-duplication: dialogs are embedded (the mean of a model's last hidden states), grouped (k-means), and
  within each group taken best-scored first, each kept only if no kept dialog is closer than `threshold` in cosine
  similarity.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.posttrain.logprobs import final_hidden

QUALITY = ("Rate the quality of the assistant's reply in this conversation: is it correct, helpful and well "
           "written? Answer with a grade from 1 (poor) to 5 (excellent).")
DIFFICULTY = ("Rate how difficult the user's request in this conversation is to answer well. Answer with a "
              "grade from 1 (trivial) to 5 (very hard).")
GRADES = ("1", "2", "3", "4", "5")


def dialog_text(messages: Sequence[dict]) -> str:
    return "\n\n".join(f"{m['role'].upper()}: {m.get('content') or ''}" for m in messages)


def _likelihoods(judge, question: str, messages: Sequence[dict], labels: Sequence[str]) -> torch.Tensor:
    prompt = [{"role": "user", "content": f"{question}\n\n<conversation>\n{dialog_text(messages)}\n</conversation>"}]
    scores = judge.choose(prompt, list(labels))
    return torch.softmax(torch.tensor([scores[label] for label in labels]), dim=0)


def grade(judge, question: str, messages: Sequence[dict]) -> float:
    """The expected grade (1..5) of a dialog under the judge's likelihood of each grade."""
    p = _likelihoods(judge, question, messages, GRADES)
    return float((p * torch.arange(1, len(GRADES) + 1, dtype=p.dtype)).sum())


def topic(judge, messages: Sequence[dict], topics: Sequence[str]) -> str:
    """The likeliest of `topics` for a dialog."""
    question = "Which topic is this conversation about? Answer with one of: " + ", ".join(topics) + "."
    return topics[int(_likelihoods(judge, question, messages, topics).argmax())]


def annotate(judge, rows: Sequence[dict], topics: Sequence[str] = ()) -> list[dict]:
    """Each SFT row with "quality" and "difficulty" (and "topic" if topics are given) from the judge."""
    out = []
    for row in rows:
        messages = row["messages"]
        extra = {"quality": grade(judge, QUALITY, messages), "difficulty": grade(judge, DIFFICULTY, messages)}
        if topics:
            extra["topic"] = topic(judge, messages, topics)
        out.append({**row, **extra})
    return out


@torch.no_grad()
def embed(llm, texts: Sequence[str], batch_size: int = 8, max_tokens: int = 512) -> torch.Tensor:
    """Unit-length embeddings [n, dim]: the mean of the model's normalised last hidden states over each text."""
    model = llm.model
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [llm.tokenizer.encode(t, bos=True)[:max_tokens] for t in texts[start:start + batch_size]]
        tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        hidden = final_hidden(model, tokens.to(llm.device)).float().cpu()
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def spherical_kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = 20) -> list[int]:
    """Cluster labels of unit vectors by cosine similarity (Lloyd's iterations from k seeded distinct points)."""
    generator = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iterations):
        labels = (x @ centers.T).argmax(-1)
        # Every cluster's sum in one pass (a mask per cluster had been k passes over the data); an empty one stays.
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        filled = torch.bincount(labels, minlength=k) > 0
        centers[filled] = torch.nn.functional.normalize(sums[filled], dim=-1)
    return labels.tolist()


def semantic_dedup(embeddings: torch.Tensor, scores: Sequence[float], threshold: float = 0.95,
                   n_clusters: int = 1, seed: int = 0) -> list[int]:
    """Indices kept (in input order): within each cluster, best score first, dropping any example whose cosine
    similarity to one already kept exceeds `threshold`."""
    embeddings = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    n = len(embeddings)
    labels = spherical_kmeans(embeddings, n_clusters, seed) if 1 < n_clusters < n else [0] * n
    clusters: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        clusters.setdefault(label, []).append(i)
    kept: list[int] = []
    for members in clusters.values():
        members.sort(key=lambda i: -scores[i])
        # The kept vectors in one growing buffer: gathered anew for every candidate, 16,000 had taken 127 s.
        chosen, vectors = [], embeddings.new_empty(len(members), embeddings.shape[1])
        for i in members:
            if not chosen or float((vectors[:len(chosen)] @ embeddings[i]).max()) <= threshold:
                vectors[len(chosen)] = embeddings[i]
                chosen.append(i)
        kept += chosen
    return sorted(kept)


def curate(judge, embedder, rows: Sequence[dict], *, threshold: float = 0.95, n_clusters: int = 1,
           min_quality: float = 0.0, topics: Sequence[str] = ()) -> list[dict]:
    """Annotate with the judge, drop rows under `min_quality`, then de-duplicate by quality × difficulty."""
    scored = [r for r in annotate(judge, rows, topics) if r["quality"] >= min_quality]
    if not scored:
        return []
    vectors = embed(embedder, [dialog_text(r["messages"]) for r in scored])
    keep = semantic_dedup(vectors, [r["quality"] * r["difficulty"] for r in scored], threshold, n_clusters)
    return [scored[i] for i in keep]
