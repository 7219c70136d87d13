"""The training losses. All are means over token positions, so their size does not depend on
batch or sequence length."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over positions. The T^2
    keeps the gradient's size independent of T (Hinton et al., 2015)."""
    v = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature ** 2


def hidden_pairs(keep: tuple[int, ...], teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into Hugging Face's hidden_states tuples (0: the embeddings,
    k: the output of block k - 1, the last: the final norm's output). Student block j stands
    in for teacher blocks keep[j] .. keep[j + 1] - 1, so its output is matched with the
    teacher's state where keep[j + 1] starts; the last block's with the teacher's final state."""
    n = len(keep)
    return [(j + 1, keep[j + 1] if j + 1 < n else teacher_layers) for j in range(n)]


def hidden_mse(student_hidden: tuple, teacher_hidden: tuple, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Mean over the pairs of MSE(student, teacher) / mean(teacher^2): relative, so layers whose
    residual stream is large do not drown the others (the denominator is a constant)."""
    total = 0.0
    for s, t in pairs:
        ref = teacher_hidden[t].float()
        total = total + F.mse_loss(student_hidden[s].float(), ref) / ref.pow(2).mean().clamp_min(1e-12)
    return total / len(pairs)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
