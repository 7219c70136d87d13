"""Held-out perplexity: exp of the mean next-token loss over every position of consecutive
windows (each window is scored on its own, as the model would see a fresh context)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, windows: np.ndarray, batch: int = 8) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(np.ascontiguousarray(windows[i:i + batch]))
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"))
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
