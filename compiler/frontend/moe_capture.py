"""Capture Hugging Face mixture-of-experts blocks in a form torch.export can trace.

transformers 5 runs every experts block decorated with `use_experts_implementation`
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, gpt-oss, ... about 60 families) through an
"experts implementation" chosen on the config:
- "eager" loops over the experts that got tokens (`nonzero`, `where`, `index_add_`): a
  data-dependent loop that torch.export cannot trace with symbolic batch/seq;
- "grouped_mm" (the default) sorts tokens by expert into an opaque custom op;
- "batched_mm" gathers each (token, chosen expert) pair's matrix, `w[ids]`, and
  multiplies with `bmm`: the same arithmetic as eager, static shapes, plain ATen ops.
While exporting we switch such models to "batched_mm" and restore the user's choice after.
passes/fuse_moe.py then rewrites gather + bmm into `Op.ROUTED_MATMUL`, whose kernel
reads each token's chosen experts' weights in place (no gathered copy, no other expert).
"""
from __future__ import annotations

from typing import Callable

import torch

EXPORT_EXPERTS_IMPLEMENTATION = "batched_mm"


def _is_experts_block(m: torch.nn.Module) -> bool:
    # attributes the `use_experts_implementation` decorator gives the experts class
    return isinstance(getattr(m, "has_gate", None), bool) and hasattr(m, "is_transposed") and hasattr(m, "config")


def use_exportable_experts(model: torch.nn.Module) -> Callable[[], None]:
    """Switch every HF model inside `model` that holds experts blocks to the batched_mm
    experts implementation; returns a function that restores the previous choice."""
    if not any(_is_experts_block(m) for m in model.modules()):
        return lambda: None
    owners = [m for m in model.modules()
              if callable(getattr(m, "set_experts_implementation", None))
              and callable(getattr(m, "get_experts_implementation", None))]
    saved = [(m, m.get_experts_implementation()) for m in owners]
    for m in owners:
        m.set_experts_implementation(EXPORT_EXPERTS_IMPLEMENTATION)

    def restore() -> None:
        for m, impl in reversed(saved):
            m.set_experts_implementation(impl)
    return restore
