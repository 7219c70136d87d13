"""Student construction: kept layers copied (a keep-all student is the teacher; a 2-layer one
equals the teacher with its other blocks removed), width pruning (equals the teacher with the
dropped channels and heads zeroed), and the importance scores that pick them."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmc.distill.select import choose_layers, choose_width, layer_importance, unit_scores
from llmc.distill.student import Width, build_student

from conftest import LAYERS


def _ids(vocab: int, seed: int, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _without(teacher, keep):
    """Reference: the teacher's own modules, only blocks `keep` left in its layer list."""
    ref = copy.deepcopy(teacher)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    return ref.eval()


def test_keep_all_student_equals_teacher(teacher):
    student = build_student(teacher, tuple(range(LAYERS))).eval()
    ids = _ids(teacher.config.vocab_size, 1)
    torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids), rtol=0, atol=0)
    # copies, not shared tensors: training the student must leave the teacher alone
    up = student.model.layers[0].mlp.up_proj.weight
    assert up.data_ptr() != teacher.model.layers[0].mlp.up_proj.weight.data_ptr()


@pytest.mark.parametrize("keep", [(0, 2), (3,), (1, 2, 3)])
def test_kept_layers_are_the_teachers(teacher, keep):
    student = build_student(teacher, keep).eval()
    assert student.config.num_hidden_layers == len(keep) and len(student.model.layers) == len(keep)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(len(keep)))
    ids = _ids(teacher.config.vocab_size, 2)
    torch.testing.assert_close(_logits(student, ids), _logits(_without(teacher, keep), ids), rtol=1e-6, atol=1e-6)


def test_width_pruned_student_equals_teacher_with_units_zeroed(teacher):
    keep = (0, 3)
    width = Width(channels=((1, 5, 6, 30, 63), (0, 2, 4, 8, 9)), groups=((1,), (0,)))
    student = build_student(teacher, keep, width).eval()
    cfg = student.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (5, 2, 1, 8)
    ref = _without(teacher, keep)
    d, rep = 8, 2  # head_dim, query heads per KV head
    for layer, ch, groups in zip(ref.model.layers, width.channels, width.groups):
        drop_ch = [c for c in range(64) if c not in ch]
        layer.mlp.down_proj.weight.data[:, drop_ch] = 0  # the channel adds nothing to the residual
        for g in range(2):
            if g not in groups:  # nor do the query heads of a dropped KV group
                layer.self_attn.o_proj.weight.data[:, g * rep * d:(g + 1) * rep * d] = 0
    ids = _ids(teacher.config.vocab_size, 3)
    torch.testing.assert_close(_logits(student, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)


def test_loss_importance_is_the_loss_rise_without_the_layer(teacher):
    windows = _ids(teacher.config.vocab_size, 4, (4, 33))

    def loss(model):
        logits = _logits(model, windows[:, :-1])
        return float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))

    scores = layer_importance(teacher, windows, "loss")
    base = loss(teacher)
    want = [loss(_without(teacher, [j for j in range(LAYERS) if j != i])) - base for i in range(LAYERS)]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    assert choose_layers(scores, 2) == tuple(sorted(np.argsort(-np.asarray(want), kind="stable")[:2].tolist()))


def test_cosine_importance(teacher):
    windows = _ids(teacher.config.vocab_size, 5, (2, 17))
    seen = []

    def record(module, args, kwargs, out):
        seen.append((args[0] if args else kwargs["hidden_states"], out))

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in teacher.model.layers]
    try:
        _logits(teacher, windows[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    want = [float(1 - F.cosine_similarity(i, o, dim=-1).mean()) for i, o in seen]
    np.testing.assert_allclose(layer_importance(teacher, windows, "cosine"), want, rtol=1e-5)


def test_choose_layers_keeps_model_order():
    assert choose_layers([0.1, 0.5, -0.2, 0.3], 2) == (1, 3)
    assert choose_layers([0.2, 0.2, 0.1], 1) == (0,)  # a tie goes to the earlier layer


def test_unit_scores_are_contribution_norms(teacher):
    windows = _ids(teacher.config.vocab_size, 6, (2, 17))
    layer = teacher.model.layers[1]
    got = {}

    def keep_input(name):
        def hook(module, args):
            got[name] = args[0].flatten(0, -2)  # returns None: the input goes on unchanged
        return hook

    h1 = layer.mlp.down_proj.register_forward_pre_hook(keep_input("mlp"))
    h2 = layer.self_attn.o_proj.register_forward_pre_hook(keep_input("attn"))
    try:
        _logits(teacher, windows[:, :-1])
    finally:
        h1.remove(), h2.remove()
    w_down, w_o = layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight
    # a channel's contribution is x_c * W_down[:, c]; a head's is its slice through W_o's columns
    mlp_ref = torch.stack([(got["mlp"][:, c:c + 1] * w_down[:, c]).norm(dim=-1).mean() for c in range(64)])
    heads = torch.stack([(got["attn"][:, h * 8:(h + 1) * 8] @ w_o[:, h * 8:(h + 1) * 8].T).norm(dim=-1).mean()
                         for h in range(4)])
    (mlp, groups), = unit_scores(teacher, (1,), windows)
    torch.testing.assert_close(mlp, mlp_ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(groups, heads.view(2, 2).sum(-1).detach(), rtol=1e-4, atol=1e-6)
    width = choose_width([(mlp, groups)], 0.25)
    assert width.channels[0] == tuple(sorted(torch.topk(mlp_ref, 16).indices.tolist()))
    assert width.groups[0] == (int(heads.view(2, 2).sum(-1).argmax()),)
