"""prepare_qat / convert: put fake quantization into a torch model and take it out again.

Which linears: every nn.Linear the quantize pass would quantize, by the same rules
(passes/quantize.py): not an embedding (nn.Embedding is not a Linear), not a linear whose
weight is also an embedding's (a tied LM head), and not the model's output embedding (the
LM head) unless the scheme asks for `quantize_lm_head`. Group sizes are checked against
every chosen linear's K before anything is swapped, with the same message as the pass.
"""
from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..errors import LLMCError
from ..passes.quant.learned import GridEntry, LearnedGrid
from ..passes.quant.scheme import QuantScheme
from .fake_quant import FakeQuantLinear


def _scheme(scheme: str | QuantScheme, group: int | None, symmetric: bool) -> QuantScheme:
    if not isinstance(scheme, QuantScheme):
        scheme = QuantScheme(scheme, 128 if group is None else group, symmetric)  # LLMCError on a bad kind/group
    if scheme.kind not in ("int8", "int4"):
        raise LLMCError(f"QAT of {scheme.kind!r} is not built yet: prepare_qat fake-quantizes weights only "
                        f"(int8 or int4)")
    return scheme


def _targets(model: nn.Module, scheme: QuantScheme) -> list[tuple[str, nn.Linear]]:
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or id(m.weight) in embedding_weights:
            continue
        if m is head and not scheme.quantize_lm_head:
            continue
        out.append((name, m))
    return out


def prepare_qat(model: nn.Module, scheme: str | QuantScheme = "int4", *, group: int | None = None,
                symmetric: bool = False, inplace: bool = False) -> nn.Module:
    """The model with its quantizable nn.Linear modules replaced by FakeQuantLinear
    (scales initialised from RTN); fine-tune it in torch, then `convert` it."""
    scheme = _scheme(scheme, group, symmetric)
    targets = _targets(model, scheme)
    if not targets:
        raise LLMCError(f"prepare_qat: {type(model).__name__} has no nn.Linear to quantize")
    if scheme.bits == 4:
        bad = [f"{n} (K={m.in_features})" for n, m in targets if m.in_features % scheme.group]
        if bad:
            fits = [g for g in (128, 64, 32) if all(m.in_features % g == 0 for _, m in targets)]
            raise LLMCError(f"int4 group size {scheme.group} does not divide the input size K of {len(bad)} "
                            f"linear(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
                            + (f"; group {fits[0]} divides every K" if fits else ""))
    if not inplace:
        model = copy.deepcopy(model)
        targets = _targets(model, scheme)
    for name, m in targets:
        _set(model, name, FakeQuantLinear(m, scheme.bits, scheme.group, scheme.is_symmetric))
    return model


def scale_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The learnable scales (for an optimizer parameter group of their own)."""
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            yield m.weight_scale


def convert(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, LearnedGrid]:
    """(the model with each FakeQuantLinear replaced by an nn.Linear holding its fake-quantized
    weight, already on the grid; the LearnedGrid of their scales). Compile the first with
    `llmc.compile(model, ..., quant=grid)`: the artifact's codes are exactly these."""
    if not inplace:
        model = copy.deepcopy(model)
    fq = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not fq:
        raise LLMCError("convert: the model has no FakeQuantLinear (call llmc.quant.prepare_qat first)")
    kinds = {(m.bits, m.group if m.bits == 4 else 0, m.symmetric) for _, m in fq}
    if len(kinds) != 1:
        raise LLMCError(f"convert: the fake-quantized linears use {len(kinds)} different schemes; one grid has one")
    bits, group, symmetric = kinds.pop()
    entries = {}
    for name, m in fq:
        with torch.no_grad():
            w = m.fake_weight().detach().clone()
            s = m.effective_scale().detach().cpu().numpy().astype(np.float32)
            z = None if m.symmetric else m.weight_zero.detach().cpu().numpy().astype(np.float32)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            lin.bias = m.bias
        _set(model, name, lin)
        entries[f"{name}.weight"] = GridEntry(w.cpu().numpy(), s, z)
    return model, LearnedGrid("int8" if bits == 8 else "int4", group or 128, symmetric, entries)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


__all__ = ["prepare_qat", "convert", "scale_parameters"]
