"""llmc.runtime: loads an llmc artifact and runs it with TVM's runtime, numpy and
safetensors only. Nothing here imports torch, the TVM compiler, or llmc.compiler."""
