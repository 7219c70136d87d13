"""Passes that turn a captured causal LM into what an LLM server runs: derive_step (the
ragged, paged-KV step function) and check_tokenwise (the property it relies on)."""
from .derive_step import StepSpec, derive_step
from .tokenwise import check_tokenwise

__all__ = ["StepSpec", "derive_step", "check_tokenwise"]
