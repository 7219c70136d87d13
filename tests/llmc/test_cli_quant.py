"""`llmc compile --quant ...`: bad quantization options are refused before the model is
loaded (no "loading" progress line), with the cause named."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,msg", [
    (["--quant", "int3"], "unknown quantization scheme 'int3'"),
    (["--quant", "int4", "--method", "gptq"], "needs calibration text"),
    (["--quant", "int4", "--method", "awq", "--calib", "MISSING"], "does not exist"),
    (["--quant", "int4", "--method", "gptq", "--calib", "EMPTY"], "is empty"),
    (["--quant", "int4", "--group", "100"], "group size must be one of"),
    (["--quant", "int8", "--method", "magic"], "unknown quantization method"),
    (["--group", "64"], "is a quantization option"),
    (["--kv-cache-dtype", "int4"], "unknown KV cache dtype 'int4'"),
    (["--kv-cache-dtype", "int8", "--no-generate"], "belongs to the step function"),
    (["--kv-cache-dtype", "fp8", "--target", "rocm:gfx942"], "runs on the CPU and CUDA backends"),
    (["--quant", "fp8", "--target", "cuda:sm_80"], "needs float8 tensor cores (sm_89 or newer)"),
    (["--quant", "w8a8", "--target", "rocm:gfx942"], "runs on the CPU and CUDA backends"),
])
def test_bad_quant_options_fail_before_loading(tmp_path, args, msg):
    (tmp_path / "EMPTY").write_text("")
    args = [str(tmp_path / a) if a in ("MISSING", "EMPTY") else a for a in args]
    r = subprocess.run([sys.executable, "-m", "llmc", "compile", "tiny-llama", "-o", str(tmp_path / "o.llmc"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and msg in r.stderr, r.stderr
    assert "loading" not in r.stderr and "Traceback" not in r.stderr, r.stderr
