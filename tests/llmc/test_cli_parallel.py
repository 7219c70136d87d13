"""The `llmc` command over the folder a `--tp N --pp M` compile writes: `inspect` lists one line per
rank (stage, shard, its layers), checks every rank's manifest, then shows rank 0 in full, and
names a rank folder from another compile; `generate` runs the 4 ranks and prints the whole
model's greedy tokens."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import llmc

pytest.importorskip("transformers")
from causal_lms import VOCAB, tiny_causal_lm  # noqa: E402


def _inspect(path):
    return subprocess.run([sys.executable, "-m", "llmc", "inspect", str(path)], capture_output=True, text=True,
                          timeout=120)


def test_inspect_and_generate_a_tp_by_pp_folder(tmp_path):
    model = tiny_causal_lm("llama", layers=2)
    ids = (torch.randint(3, VOCAB, (1, 8)),)
    bounds = {"batch": (1, 2), "seq": (1, 32)}
    art = llmc.compile(model, ids, dim_bounds=bounds, generate=True, tp=2, pp=2).export(tmp_path / "a")
    whole = llmc.compile(model, ids, dim_bounds=bounds, generate=True)
    want = whole.generate([[5, 9, 11, 3]], max_new_tokens=6, stop_token_ids=())[0].token_ids
    r = subprocess.run([sys.executable, "-m", "llmc", "generate", str(art), "--ids", "5,9,11,3", "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(t) for t in want], (r.stdout, want)
    r = _inspect(art)
    assert r.returncode == 0, r.stderr
    assert "tp 2 x pp 2 = 4 ranks" in r.stdout
    for rank in range(4):
        assert f"rank{rank}: stage {rank // 2}, shard {rank % 2}, 1 attention layers" in r.stdout
    assert "parallel: rank 0 of tp 2 x pp 2 (stage 0, shard 0)" in r.stdout
    # a rank folder of another compile (same model, another nonce) swapped in
    other = llmc.compile(model, ids, dim_bounds=bounds, generate=True, tp=2, pp=2).export(tmp_path / "b")
    shutil.rmtree(art / "rank3")
    shutil.copytree(other / "rank3", art / "rank3")
    r = _inspect(art)
    assert r.returncode != 0 and "rank3 belongs to another compile" in r.stderr, r.stderr
