"""Errors of the multi-process runtime; all are llmc.LLMCError, so callers catch one family."""
from __future__ import annotations

from ...errors import LLMCError


class DistError(LLMCError):
    """A distributed setup or communication failure: bad rendezvous variables, a peer that
    closed its connection or did not answer in time, mismatched collective calls."""


class RendezvousError(DistError):
    """Ranks that never arrived, or ranks that disagree about what they run."""


class NcclError(DistError):
    """libnccl is missing, or an NCCL call returned an error (its message included)."""


class LaunchError(DistError):
    """A supervised rank failed; `.result` holds every rank's status and stderr tail."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
