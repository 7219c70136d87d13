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


class _KdCe(torch.autograd.Function):
    """kd_weight * kd_loss(s, t, T) + ce_weight * next_token_loss(s, y) in one pass over the
    logits, with the gradient written out: T * (softmax(s / T) - softmax(t / T)) * kd_weight +
    (softmax(s) - onehot(y)) * ce_weight, over the number of positions. autograd through two
    log_softmax + kl_div + cross_entropy takes ~4x as long on a 2048 x 4096 batch (CPU), a
    sizeable part of a small student's step."""

    @staticmethod
    def forward(ctx, s, t, y, temperature: float, kd_weight: float, ce_weight: float):
        v = s.shape[-1]
        s2, t2, y1 = s.reshape(-1, v).float(), t.reshape(-1, v).float(), y.reshape(-1)
        n = s2.shape[0]
        log_t = torch.log_softmax(t2 / temperature, dim=-1)
        p_t = log_t.exp()
        log_s_T = torch.log_softmax(s2 / temperature, dim=-1)
        kd = (p_t * (log_t - log_s_T)).sum() / n * temperature ** 2
        log_s = log_s_T if temperature == 1.0 else torch.log_softmax(s2, dim=-1)
        ce = -log_s.gather(1, y1[:, None]).sum() / n
        grad = log_s_T.exp().sub_(p_t).mul_(kd_weight * temperature / n)
        if ce_weight:
            g_ce = log_s.exp().mul_(ce_weight / n)
            g_ce.scatter_add_(1, y1[:, None], torch.full((n, 1), -ce_weight / n))
            grad.add_(g_ce)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = s.shape, s.dtype
        return kd * kd_weight + ce * ce_weight

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g).reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None


def kd_ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
               temperature: float, kd_weight: float, ce_weight: float) -> torch.Tensor:
    """kd_weight * kd_loss + ce_weight * next_token_loss, fused (the same value and gradient)."""
    return _KdCe.apply(student_logits, teacher_logits.detach(), targets, float(temperature), float(kd_weight),
                       float(ce_weight))


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
