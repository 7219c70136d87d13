"""llmc: compile transformer graphs to TVM kernels and run them with a small runtime.

Importing `llmc` is cheap: the compiler (torch, TVM's compiler) loads only when
`llmc.compile` is called, and `llmc.load` needs TVM's runtime alone.
"""
from .errors import ArtifactError, InputError, LLMCError, TargetError, UnsupportedOpError

__version__ = "0.1.0"


def compile(*args, **kwargs):  # noqa: A001 - the public name is `llmc.compile`
    from .api import compile as _compile

    return _compile(*args, **kwargs)


def load(path, device: str = "cpu", **options):
    """Load an artifact: an Executor, or for a causal LM compiled for generation an LLM with
    `.generate()` (options: kv_memory=bytes of KV cache). See runtime/executor.py: load."""
    from .runtime.executor import load as _load

    return _load(path, device=device, **options)


__all__ = ["compile", "load", "LLMCError", "UnsupportedOpError", "InputError", "ArtifactError", "TargetError",
           "__version__"]
