"""How far a quantized model's next-token distributions are from the float32 model's, on real text.

KL(float32 || quantized) per token (mean and 99th percentile), how often the two agree on the likeliest token, and
each one's perplexity. Perplexity alone hides errors that cancel out; the KL does not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from herd.model.llama import KVCache


@dataclass
class Fidelity:
    kl_mean: float
    kl_p99: float
    top1: float
    ppl: float
    ppl_reference: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def logits(model, tokens: list[int], *, step: int | None = None) -> torch.Tensor:
    """[len(tokens), vocab] float32. step: feed the tokens this many at a time through a KV cache, as decoding does
    (quantized layers compute a few tokens differently from a whole prompt); None: all at once."""
    ids = torch.tensor([tokens], device=next(model.buffers()).device)
    if step is None:
        return model(ids)[0].float()
    cache = KVCache(model.config, 1, len(tokens), device=ids.device)
    return torch.cat([model(ids[:, i : i + step], cache=cache)[0] for i in range(0, len(tokens), step)]).float()


def compare(reference: torch.Tensor, quantized: torch.Tensor, tokens: list[int]) -> Fidelity:
    p_log, q_log = torch.log_softmax(reference, -1), torch.log_softmax(quantized, -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    target = torch.tensor(tokens[1:], device=reference.device)

    def ppl(log_probs):
        return float(torch.exp(-log_probs[:-1].gather(1, target[:, None]).mean()))

    return Fidelity(float(kl.mean()), float(torch.quantile(kl, 0.99)),
                    float((reference.argmax(-1) == quantized.argmax(-1)).float().mean()), ppl(q_log), ppl(p_log))
