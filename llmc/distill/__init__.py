"""`llmc distill`: a smaller student built from a teacher causal LM (kept layers, optionally
narrower MLPs and fewer attention heads) and trained to match it: temperature-scaled KL on
the logits plus MSE between mapped hidden states. The result is a Hugging Face folder that
`llmc compile` takes.

torch-only and separate from the compiler: compiler/, passes/, backends/ and runtime/ never
import this package. Importing it is cheap (torch loads when `distill` runs); see
docs/distill.md.
"""
from __future__ import annotations

from .config import DistillConfig


def distill(config: DistillConfig, **kwargs):
    """Run one distillation (see run.py: distill); returns a run.Result."""
    from .run import distill as _distill

    return _distill(config, **kwargs)


__all__ = ["DistillConfig", "distill"]
