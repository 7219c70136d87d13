"""Tensor parallelism on GPUs: greedy tokens of a tiny model identical at TP = 1, 2 and 4 (one
process per GPU, NCCL inside the step's CUDA graphs), run on the 2/4-GPU machines.

    python tests/models/test_gpu_tp.py --prepare gpu_art/tp       # build host: compile tp 1, 2, 4
    pytest -m gpu tests/models/test_gpu_tp.py                      # GPU machine (LLMC_GPU_TP=gpu_art/tp)
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(os.environ.get("LLMC_GPU_TP", "gpu_art/tp"))
PROMPTS = [[5, 6, 7, 8, 9], [3, 17, 40, 41, 2, 88, 60, 61, 33, 12, 9, 70, 71, 72, 73, 74, 75], [11] * 9]
NEW = 24
TPS = (1, 2, 4)
SHAPE = {"hidden_size": 128, "head_dim": 32, "intermediate_size": 256, "num_attention_heads": 4,
         "num_key_value_heads": 4}  # 4 kv heads: each of 4 ranks holds one


def _gpus() -> int:
    try:
        from llmc.runtime.dist.nccl import device_count

        return device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return 0


def _tokens(art: pathlib.Path, tp: int) -> list[list[int]]:
    from llmc.runtime.dist.launch import launch

    out, err = io.StringIO(), io.StringIO()
    argv = [sys.executable, "-m", "llmc.runtime.tp_run", "generate", str(art), "--max-new-tokens", str(NEW)]
    for p in PROMPTS:
        argv += ["--ids", ",".join(map(str, p))]
    launch(argv, tp, devices=list(range(tp)), stdout=out, stderr=err, timeout=300, label=False)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out.getvalue() + err.getvalue()
    return json.loads(lines[0])["token_ids"]


def _whole_tokens(art: pathlib.Path) -> list[list[int]]:
    import llmc

    llm = llmc.load(art, device="cuda")
    return [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=())]


@pytest.mark.gpu
def test_greedy_tokens_identical_at_tp_1_2_4():
    if not (ROOT / "tp1").exists():
        pytest.skip(f"no prepared artifacts under {ROOT} (run --prepare on the build host)")
    want = _whole_tokens(ROOT / "tp1")
    assert all(len(t) == NEW for t in want)
    ran = []
    for tp in TPS[1:]:
        if tp > _gpus():
            continue
        got = _tokens(ROOT / f"tp{tp}", tp)
        assert got == want, f"tp {tp}: {got} != tp 1: {want}"
        ran.append(tp)
    if not ran:
        pytest.skip("fewer than 2 GPUs")


def prepare(out: pathlib.Path, arch: str = "sm_90") -> None:
    import torch

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "helpers"))
    from causal_lms import VOCAB, tiny_causal_lm

    import llmc
    from llmc.generation import GenerateOptions

    model = tiny_causal_lm("llama", **SHAPE).to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (1, 8))
    for tp in TPS:
        cm = llmc.compile(model, (ids,), target=f"cuda:{arch}", dim_bounds={"batch": (1, 4), "seq": (1, 128)},
                          generate=GenerateOptions(max_tokens=64, max_seqs=8), tp=tp, progress=print)
        cm.export(out / f"tp{tp}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--prepare":
        prepare(pathlib.Path(sys.argv[2]))
