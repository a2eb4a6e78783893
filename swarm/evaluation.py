"""Held-out loss and perplexity of a model on the swarm's eval split (the same batches on every machine)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Evaluation:
    step: int
    loss: float  # mean next-token cross-entropy (nats) over every predicted token
    perplexity: float
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[torch.Tensor], *, step: int,
             device: torch.device | str = "cpu") -> Evaluation | None:
    """Token-weighted mean loss over ``batches``; None when there is nothing to evaluate on."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            total += float(model(input_ids=batch, labels=batch).loss) * predicted
            tokens += predicted
    finally:
        model.train(was_training)
    loss = total / max(tokens, 1)
    if not math.isfinite(loss):
        raise ValueError(f"the eval loss at step {step} is not finite: the model has diverged")
    return Evaluation(step=step, loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens)
