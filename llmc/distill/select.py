"""What the student keeps, scored on calibration windows of the training text.

Layers: `loss` scores each teacher layer by how much the next-token loss rises when that one
layer is skipped (its output replaced by its input); `cosine` by 1 - the mean cosine between
the layer's input and output hidden states (a layer that barely turns the residual stream
matters little). The highest-scoring layers are kept, in their original order.

Width: each MLP channel and each KV head group is scored by the mean norm of what it adds to
the residual stream (the channel's activation times its down-projection column; the heads'
attention output through their o-projection columns), and the top fraction is kept.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .student import ATTN_OUT, MLP_OUT, Width, decoder_layers


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _skipped(layer: torch.nn.Module):
    """Run the model with `layer` passing its input through unchanged."""
    def identity(module, args, kwargs, output):
        h = _hidden_in(args, kwargs)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = layer.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _lm_loss(model, windows: torch.Tensor) -> float:
    logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    return float(F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten()))


@torch.no_grad()
def layer_importance(model, windows: torch.Tensor, method: str) -> list[float]:
    """One score per teacher layer; larger means more important."""
    _, layers = decoder_layers(model)
    if method == "loss":
        base = _lm_loss(model, windows)
        scores = []
        for layer in layers:
            with _skipped(layer):
                scores.append(_lm_loss(model, windows) - base)
        return scores
    sums = [0.0] * len(layers)

    def recorder(i):
        def hook(module, args, kwargs, output):
            h_in = _hidden_in(args, kwargs)
            h_out = output[0] if isinstance(output, tuple) else output
            sums[i] += float(1 - F.cosine_similarity(h_in.float(), h_out.float(), dim=-1).mean())
        return hook

    handles = [layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(input_ids=windows[:, :-1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sums


def choose_layers(scores: list[float], n: int) -> tuple[int, ...]:
    """The n highest-scoring layers, in model order (ties: the earlier layer)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(order[:n]))


@torch.no_grad()
def unit_scores(model, keep: tuple[int, ...], windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per kept layer: (MLP channel scores [intermediate], KV group scores [kv heads])."""
    _, layers = decoder_layers(model)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out: dict[int, list] = {i: [None, None] for i in keep}
    handles = []
    for i in keep:
        mlp_out = getattr(layers[i].mlp, MLP_OUT)
        attn_out = getattr(layers[i].self_attn, ATTN_OUT)

        def channels(module, args, i=i):
            x = args[0].flatten(0, -2).float()  # [tokens, intermediate]
            out[i][0] = x.abs().mean(0) * module.weight.float().norm(dim=0)

        def groups(module, args, i=i):
            x = args[0].flatten(0, -2).float().view(-1, heads, d)  # [tokens, heads, head_dim]
            w = module.weight.float().view(module.weight.shape[0], heads, d)  # [hidden, heads, head_dim]
            per_head = torch.einsum("thd,ohd->tho", x, w).norm(dim=-1).mean(0)  # [heads]
            out[i][1] = per_head.view(kv, heads // kv).sum(-1)

        handles += [mlp_out.register_forward_pre_hook(channels), attn_out.register_forward_pre_hook(groups)]
    try:
        model(input_ids=windows[:, :-1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [tuple(out[i]) for i in keep]


def choose_width(scores: list[tuple[torch.Tensor, torch.Tensor]], ratio: float) -> Width:
    """The top `ratio` of each layer's channels and KV groups (at least one of each), in order."""
    def top(s: torch.Tensor) -> tuple[int, ...]:
        k = max(1, round(ratio * s.numel()))
        return tuple(sorted(torch.topk(s, k).indices.tolist()))

    return Width(tuple(top(c) for c, _ in scores), tuple(top(g) for _, g in scores))
