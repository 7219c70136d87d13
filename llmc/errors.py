"""The one exception family users see. Each names its cause (op, node, file, shape)."""


class LLMCError(Exception):
    """Base class of every error llmc raises on purpose."""


class UnsupportedOpError(LLMCError):
    """A frontend met an operator it cannot convert."""


class InputError(LLMCError):
    """A runtime input has the wrong rank, dtype, or a dim outside its bounds."""


class ArtifactError(LLMCError):
    """An artifact is missing, truncated, or from an incompatible llmc version."""


class TargetError(LLMCError):
    """An unknown or unusable compilation target."""
