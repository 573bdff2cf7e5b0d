"""Perplexity on any text or prompt-response file: each row's mean loss over its supervised tokens (the
response only, for prompt-response rows), aggregated over tokens and over rows."""

from __future__ import annotations

import math

from . import PerplexityTask, register_task


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # a diverged model's loss; perplexity is then infinite, not an error
        return math.inf


def score(records: list[dict]) -> dict[str, float]:
    """`loss` weighted by tokens (the loss of the whole file), `perplexity` = exp(loss), `loss_per_sample`
    the plain mean over rows, `tokens`, and `count` rows. Rows with no supervised token carry no loss: they
    are left out and counted in `skipped`."""
    scored = [r for r in records if r["tokens"] > 0]
    tokens = sum(r["tokens"] for r in scored)
    loss = sum(r["loss"] * r["tokens"] for r in scored) / tokens if tokens else None
    return {
        "loss": loss,
        "perplexity": _exp(loss) if loss is not None else None,
        "loss_per_sample": sum(r["loss"] for r in scored) / len(scored) if scored else None,
        "tokens": tokens,
        "count": len(records),
        "skipped": len(records) - len(scored),
    }


register_task(
    PerplexityTask(
        name="perplexity",
        version=1,
        fields=(),
        score=score,
        metrics=("loss", "perplexity", "loss_per_sample", "tokens", "count", "skipped"),
        lower_is_better=("loss", "perplexity", "loss_per_sample", "skipped"),
        description="loss and perplexity over the supervised tokens of any text or prompt-response file",
    )
)
