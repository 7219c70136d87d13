"""A matmul whose fused epilogue splits the columns into heads (bloom's QKV projection:
matmul + bias, reshaped to (b, s, heads, 3, d)) must not be computed tile by tile: the
tile's bounding box spills over columns of other parallel tasks (a race, silently wrong
with more than one thread). Run in a child process so that TVM's pool has several threads
(the test process may have started a one-thread pool already)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import sys
sys.path.insert(0, sys.argv[1])
from llmc.compiler.ir import node, sym
from llmc.compiler.ops import Op, ShapeAttrs
from tvm_cases import Case, build_cases, inp, run_case

b, s = sym("b"), sym("s")
sizes = ({"b": 2, "s": 8}, {"b": 3, "s": 13}, {"b": 1, "s": 300})
x, w, bias = inp("x", (b, s, 64)), inp("w", (64, 192)), inp("bias", (192,))
qkv = node(Op.RESHAPE, [node(Op.ADD, [node(Op.MATMUL, [x, w]), bias])], ShapeAttrs((b, s, 4, 3, 16)))
head_split = Case("mm_bias_head_split", [x, w, bias], [qkv], sizes, rtol=1e-4, atol=1e-4)
x, w = inp("x", (b, s, 32)), inp("w", (32, 96))
plain = Case("mm_plain", [x, w], [node(Op.RELU, [node(Op.MATMUL, [x, w])])], sizes, rtol=1e-4, atol=1e-4)
report = {}
ex = build_cases([head_split, plain], report)
for seed in range(5):
    run_case(ex, head_split, seed)
    run_case(ex, plain, seed)
print("strategies", report["mm_bias_head_split"][1], report["mm_plain"][1])
'''


def test_head_split_epilogue_is_right_with_threads():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TVM_NUM_THREADS="4")
    p = subprocess.run([sys.executable, "-c", CHILD, str(here)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    # the plain epilogue keeps the tiled (fused) matmul schedule; the head split does not
    assert "strategies matmul_separate_epilogue matmul" in p.stdout, p.stdout
