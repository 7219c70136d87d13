"""The one exception family users see. Each names its cause (op, node, file, shape)."""


class LLMCError(Exception):
    """Base class of every error llmc raises on purpose."""


class UnsupportedOpError(LLMCError):
    """A frontend met an operator it cannot convert."""


class InputError(LLMCError):
    """A runtime input has the wrong type, rank or dtype, a dim outside its bounds, or an
    index value outside its table (names the input, the value and its position)."""


class ArtifactError(LLMCError):
    """An artifact is missing, truncated, damaged, inconsistent (its manifest names the key
    path), or from an incompatible llmc version."""


class TargetError(LLMCError):
    """An unknown or unusable compilation target."""
