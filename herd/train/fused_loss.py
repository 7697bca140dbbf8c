"""Cross-entropy over a linear output layer without the whole [tokens, vocab] logits: a chunk of rows at a time.

With a large vocabulary the logits dwarf everything else a small model computes: 1,024 tokens x 49,152 entries are
200 MB, written by the projection, read and written again by log-softmax, its backward and the zero-filled gradient
of the target pick. Here only the labelled rows are projected, a chunk at a time into one reused buffer; each
chunk's softmax is taken in place, gives the loss, becomes the gradient of the summed loss (softmax minus one-hot)
and is multiplied straight into the gradients of the hidden states and of the weight. The backward pass only scales
what the forward kept. The same matmuls run, over the labelled rows only; on bench/train.py's model (49K
vocabulary) a training step went from about 670 ms (plain logits and cross-entropy) to 460 ms. (Liger Kernel's
fused linear cross-entropy does this on GPUs.)
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MB in float32): large enough for an efficient matmul


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Only labelled rows are projected: the others add nothing to the loss or to either gradient.
        rows_kept = (labels != ignore_index).nonzero()[:, 0]
        kept, targets = hidden[rows_kept], labels[rows_kept]
        grad_kept = torch.empty_like(kept) if need_hidden else None
        # The first chunk writes the weight's gradient, later ones add to it: no pass to zero-fill it first.
        grad_weight = (torch.empty_like(weight) if len(kept) else torch.zeros_like(weight)) if need_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        # One logits buffer for every chunk: a fresh 32 MB tensor per chunk costs its page faults each time.
        buffer = hidden.new_empty((min(rows, len(kept)), weight.shape[0]), dtype=torch.float32)
        for start in range(0, len(kept), rows):
            h, y = kept[start:start + rows], targets[start:start + rows]
            logits = buffer[:len(y)]
            if weight.dtype == torch.float32:
                torch.mm(h, weight.T, out=logits)
            else:
                logits.copy_(h @ weight.T)
            # Softmax in place (one fused pass per row); each row's loss is -log p(target).
            probs = torch._softmax(logits, -1, False, out=logits)
            picked = probs.gather(1, y[:, None])[:, 0]
            loss = -picked.log()
            far = picked < 1e-30  # p(target) underflowed: that row's loss again from its logits, exactly
            if far.any():
                exact = (h[far] @ weight.T).float()
                loss[far] = torch.logsumexp(exact, -1) - exact.gather(1, y[far][:, None])[:, 0]
            total += loss.sum()
            if need_hidden or need_weight:
                probs[torch.arange(len(y), device=probs.device), y] -= 1  # softmax minus one-hot
                grad = probs.to(weight.dtype)
                if need_hidden:
                    torch.mm(grad, weight, out=grad_kept[start:start + rows])
                if need_weight and start:
                    grad_weight.addmm_(grad.T, h)
                elif need_weight:
                    torch.mm(grad.T, h, out=grad_weight)
        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden[rows_kept] = grad_kept
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.scaled = False
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        # Scaled in place: the weight's gradient is as large as the output layer, and a copy of it costs a pass.
        if ctx.scaled:
            raise RuntimeError("linear_cross_entropy: its gradients were already handed out; a second backward "
                               "through it (retain_graph=True) is not supported")
        ctx.scaled = True
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden.mul_(grad_total),
                None if grad_weight is None else grad_weight.mul_(grad_total), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """sum over the labelled rows of cross_entropy(hidden @ weight.T, labels): hidden [N, D], weight [V, D],
    labels [N] (`ignore_index` rows count nothing); the same value and gradients as the plain computation."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index)
