"""The artifact manifest (JSON beside the kernel library): reading, checking, shape math.

Kept free of compiler imports: symbolic dims arrive as JSON polynomials
`[[coeff, [sym, ...]], ...]` (or plain ints) and are evaluated here.
"""
from __future__ import annotations

import json
import pathlib
from typing import Mapping

from ..errors import ArtifactError

FORMAT = "llmc-artifact"
FORMAT_VERSION = 1
LIBRARY = "kernels.so"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def eval_dim(d, env: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    total = 0
    for coeff, names in d:
        v = coeff
        for s in names:
            v *= env[s]
        total += v
    return total


def read_manifest(path: pathlib.Path) -> dict:
    f = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an llmc artifact folder (expected {MANIFEST}, {LIBRARY}, {WEIGHTS})")
    try:
        m = json.loads(f.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing {MANIFEST}; not an llmc artifact or an interrupted export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{f}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{f}: not an llmc manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {m.get('format_version')} (written by llmc {m.get('llmc_version')}) "
            f"is not supported by this runtime (format {FORMAT_VERSION}); recompile it with this llmc")
    for lib_file in (m.get("library", LIBRARY), WEIGHTS):
        if not (path / lib_file).is_file():
            raise ArtifactError(f"{path}: missing {lib_file}")
    return m
