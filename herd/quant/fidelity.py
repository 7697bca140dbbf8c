"""How far a quantized model's next-token distributions are from the float32 model's, on real text.

KL(float32 || quantized) per token (mean and 99th percentile), how often the two agree on the likeliest token, and
each one's perplexity. Perplexity alone hides errors that cancel out; the KL does not.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from herd.generate.kv_cache import PagedKVCache, StepAttention, cache_dtype
from herd.quant.phase import prompt_rows


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
    """[len(tokens), vocab] float32. step: feed the tokens this many at a time as generated tokens through the
    engine's paged cache, as decoding computes them (the fused decode block on a CPU; without the kernel, int8
    activations where a prompt multiplies exactly); None: all at once, as a prompt."""
    ids = torch.tensor([tokens], device=next(model.buffers()).device)
    if step is None:
        return model(ids)[0].float()
    block = 16
    blocks = list(range(-(-len(tokens) // block)))
    cache = PagedKVCache(model.config, len(blocks), block, device=ids.device,
                         dtype=cache_dtype(ids.device, torch.float32))
    out = []
    for i in range(0, len(tokens), step):
        chunk = ids[:, i:i + step]
        n = chunk.shape[1]
        with prompt_rows(torch.zeros(n, dtype=torch.long, device=ids.device)):  # all generated tokens
            out.append(model(chunk, torch.arange(i, i + n, device=ids.device).unsqueeze(0),
                             cache=StepAttention(cache, [(blocks, i, n, n > 1)]))[0])
    return torch.cat(out).float()


def compare(reference: torch.Tensor, quantized: torch.Tensor, tokens: list[int]) -> Fidelity:
    p_log, q_log = torch.log_softmax(reference, -1), torch.log_softmax(quantized, -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    target = torch.tensor(tokens[1:], device=reference.device)

    def ppl(log_probs):
        return float(torch.exp(-log_probs[:-1].gather(1, target[:, None]).mean()))

    return Fidelity(float(kl.mean()), float(torch.quantile(kl, 0.99)),
                    float((reference.argmax(-1) == quantized.argmax(-1)).float().mean()), ppl(q_log), ppl(p_log))
