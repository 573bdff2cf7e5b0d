"""The per-sample loss every stage shares: estimate's G, train's probe losses and evaluate's perplexity.

A sample's loss is the mean cross-entropy over its supervised tokens (docs/design.md §1), so a sample counts the
same whatever its length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import data

# The loss works in float32 chunks of rows of about this many bytes; two live at once (plan.py counts them).
LOSS_CHUNK_BYTES = 32 * 2**20


def per_sample_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ over the batch of each sample's loss, and the number of supervised targets.

    Language modelling: logits [batch, T, vocab], labels [batch, T] with data.IGNORE where no loss; a sample's
    loss is its mean next-token cross-entropy. Classification: logits [batch, classes], labels [batch] (class
    ids); a sample's loss is the cross-entropy of its label. Regression: logits [batch, 1], float labels
    [batch]; a sample's loss is its squared error (HF's MSE).
    """
    if labels.dim() == 1 and labels.is_floating_point():  # regression: one output, squared error
        return F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum"), labels.numel()
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    # The target of position t is label t+1; the last position has none. Shifting the labels, not the logits,
    # keeps the logits un-copied.
    targets = F.pad(labels[:, 1:], (0, 1), value=data.IGNORE)
    supervised = targets != data.IGNORE
    counts = supervised.sum(dim=1)
    # A sample with no supervised token has loss 0 (it adds nothing), not 0/0.
    weights = supervised / counts.clamp(min=1)[:, None].to(torch.float32)
    vocab = logits.shape[-1]
    loss = _WeightedCrossEntropy.apply(logits.reshape(-1, vocab), targets.reshape(-1), weights.reshape(-1))
    return loss, int(counts.sum())


def _chunk_rows(vocab: int) -> int:
    """Rows of logits per float32 chunk in _WeightedCrossEntropy: LOSS_CHUNK_BYTES of temporaries a chunk."""
    return max(1, LOSS_CHUNK_BYTES // (4 * vocab))


class _WeightedCrossEntropy(torch.autograd.Function):
    """Σ_t w_t·(−log_softmax(z_t)[y_t]) over the rows z_t of logits [N, V], in float32 chunks of rows.

    Same value as `F.cross_entropy(z.float(), y, reduction="none") @ w`, but autograd's version keeps a float32
    log-softmax [N, V] for backward and builds two more float32 [N, V] tensors in it (plus the float32 copy of
    bf16 logits); this keeps the logits and the log-sum-exp of each row, and writes the gradient
    w_t·(softmax(z_t) − e_y) chunk by chunk into one [N, V] tensor of the logits' dtype. Rows with w_t = 0
    contribute nothing. Passes over [N, V]: log_softmax's fused two (per chunk) forward; backward
    exp(z − (lse − log w)) = w·softmax, one subtraction and one exp, as few as autograd's (profiled: the first
    version, with torch.logsumexp and a separate multiply, took 0.3 CPU s more per SmolLM2 batch than autograd's).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows = _chunk_rows(logits.shape[1])
        index = targets.clamp(min=0)[:, None]
        token_loss = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(token_loss)
        for i in range(0, len(logits), rows):
            part = slice(i, i + rows)
            z = logits[part].float()
            nll = torch.log_softmax(z, dim=1).gather(1, index[part]).squeeze(1).neg_()
            token_loss[part] = nll
            lse[part] = z.gather(1, index[part]).squeeze(1) + nll  # z_y − log_softmax(z)_y
        ctx.save_for_backward(logits, index, weights, lse)
        return torch.where(weights > 0, token_loss * weights, 0.0).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, index, weights, lse = ctx.saved_tensors
        rows = _chunk_rows(logits.shape[1])
        scale = weights * grad_loss
        # w·softmax(z) = exp(z − (lse − log w)); w = 0 gives exp(−inf) = 0. A negative w (a caller's −loss) cannot
        # go into the exponent: then the multiply is separate.
        folded = bool((scale >= 0).all())
        shift = (lse - torch.log(scale) if folded else lse)[:, None]
        grad = torch.empty_like(logits)
        for i in range(0, len(logits), rows):
            part = slice(i, i + rows)
            # float32 logits: computed in place in the gradient's rows; others in a float32 chunk, then cast.
            chunk = grad[part] if grad.dtype == torch.float32 else None
            chunk = torch.sub(logits[part].float(), shift[part], out=chunk).exp_()
            if not folded:
                chunk.mul_(scale[part, None])
            chunk.scatter_add_(1, index[part], -scale[part, None])
            if chunk.data_ptr() != grad[part].data_ptr():
                grad[part] = chunk
        return grad, None, None


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch without its labels, on `device`: what the model's forward takes."""
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def mean_loss(model: nn.Module, examples: Sequence[data.Example], batch_size: int, pad_id: int) -> float:
    """Mean over samples of each sample's mean supervised-token loss (forward passes only)."""
    device = next(model.parameters()).device
    total = 0.0
    for batch in data.make_batches(examples, batch_size, pad_id):
        logits = model(**model_inputs(batch, device)).logits
        total += float(per_sample_loss_sum(logits, batch["labels"].to(device))[0])
    return total / max(1, len(examples))
