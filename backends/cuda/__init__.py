"""CUDA backend pieces: the llmc CUDA shim (cuBLASLt GEMMs, flash attention) and its build."""
