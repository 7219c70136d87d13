"""Shared by the tests of llmc's CPU kernel library (backends/cpu_gemm): whether this processor
runs it, and the library itself."""
import pytest

from llmc.backends.cpu_gemm import build_gemm_library
from llmc.runtime.cpu_features import host_cpu_features
from llmc.runtime.cpu_gemm import Sgemm, load_sgemm

HAS_AVX512 = {"AVX512F", "AVX512VL"} <= host_cpu_features()
# a processor without AVX-512 F/VL runs numpy instead, which the rest of the suite exercises
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="llmc's CPU kernel library runs on AVX-512F/VL processors only")


def kernel_library() -> Sgemm:
    s = load_sgemm(build_gemm_library())
    assert s is not None
    return s
