"""Tensor parallelism on the CPU, end to end: `llmc.compile(tp=N)` -> N rank artifacts -> N real
processes (the launcher, the host communicator, the collectives as runtime calls) -> the same
greedy tokens as the whole model in one process; and the refusals when ranks do not match."""
from __future__ import annotations

import io
import shutil
import sys
import types

import numpy as np
import pytest
import torch

import llmc
from llmc.errors import ArtifactError
from llmc.runtime.dist.errors import LaunchError
from llmc.runtime.dist.launch import launch
from llmc.runtime.executor import check_rank
from llmc.runtime.artifact_files import load_weights, read_manifest

pytest.importorskip("transformers")
from causal_lms import VOCAB, tiny_causal_lm  # noqa: E402

BOUNDS = {"batch": (1, 4), "seq": (1, 64)}
PROMPTS = [[5, 6, 7, 8, 9], [3, 17, 40, 41, 2, 88, 60, 61, 33, 12, 9]]


def _compile(model, tp):
    return llmc.compile(model, (torch.randint(3, VOCAB, (1, 8)),), dim_bounds=BOUNDS, generate=True, tp=tp)


def _run_ranks(art, n, extra=(), prompts=PROMPTS):
    out, err = io.StringIO(), io.StringIO()
    argv = [sys.executable, "-m", "llmc.runtime.tp_run", "generate", str(art), "--max-new-tokens", "12", *extra]
    for p in prompts:
        argv += ["--ids", ",".join(map(str, p))]
    launch(argv, n, stdout=out, stderr=err, timeout=240, label=False)
    import json

    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out.getvalue() + err.getvalue()  # rank 0 alone prints
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama", num_key_value_heads=4)


@pytest.fixture(scope="module")
def whole_tokens(llama):
    one = llmc.compile(llama, (torch.randint(3, VOCAB, (1, 8)),), dim_bounds=BOUNDS, generate=True)
    return [o.token_ids for o in one.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())]


@pytest.mark.parametrize("tp", [2, 4])
def test_greedy_tokens_match_the_whole_model(llama, whole_tokens, tp, tmp_path):
    art = _compile(llama, tp).export(tmp_path / "art")
    assert sorted(p.name for p in art.iterdir()) == [f"rank{r}" for r in range(tp)]
    m = read_manifest(art / "rank1")
    assert (m.parallel.tp, m.parallel.rank) == (tp, 1)
    # each rank's GEMM weights stored [N, K], as the build stores rank 0's for llmc's CPU GEMM:
    # the row-parallel O projection's rank-1 shard is its torch weight's second column block
    d = llama.config.hidden_size
    o = load_weights(art / "rank1", m)["model.layers.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(o, llama.model.layers[0].self_attn.o_proj.weight.detach().numpy()[:, d // tp:2 * d // tp])
    assert {k.route for k in m.generation.program.kernels.values()} >= {"coll", "kv"}
    got = _run_ranks(art, tp)
    assert got["tp"] == tp and got["token_ids"] == whole_tokens
    if tp == 2:  # the CLI launches the ranks itself
        import subprocess

        r = subprocess.run([sys.executable, "-m", "llmc", "generate", str(art), "--ids", ",".join(map(str, PROMPTS[0])),
                            "--max-new-tokens", "12"], capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(t) for t in whole_tokens[0]]


def test_mismatched_ranks_are_refused(llama, tmp_path):
    a = _compile(llama, 2).export(tmp_path / "a")
    b = _compile(llama, 2).export(tmp_path / "b")  # the same architecture: the same programs, another compile
    shutil.rmtree(a / "rank1")
    shutil.copytree(b / "rank1", a / "rank1")
    with pytest.raises(LaunchError) as e:
        _run_ranks(a, 2)
    assert "fingerprint" in e.value.result.report()
    with pytest.raises(LaunchError) as e:  # a job of another size than the artifact's group
        _run_ranks(b, 3)
    assert "rank2" in e.value.result.report()
    with pytest.raises(ArtifactError, match="rank 0 of a tensor-parallel group of 2"):
        llmc.load(b / "rank0")  # alone, without its group
    wrong = types.SimpleNamespace(rank=1, world_size=2)
    with pytest.raises(ArtifactError, match="is rank 0 of 2, but this process is rank 1 of 2"):
        check_rank(read_manifest(b / "rank0"), wrong, b / "rank0")


def test_pipeline_stages_give_the_whole_models_tokens(tmp_path):
    """PP: the step cut into 2 and 4 stages by layers, one process each, the residual stream sent
    stage to stage, the last stage's logits broadcast: the whole model's greedy tokens."""
    model = tiny_causal_lm("llama", layers=4)
    one = llmc.compile(model, (torch.randint(3, VOCAB, (1, 8)),), dim_bounds=BOUNDS, generate=True)
    want = [o.token_ids for o in one.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())]
    for pp in (2, 4):
        art = llmc.compile(model, (torch.randint(3, VOCAB, (1, 8)),), dim_bounds=BOUNDS, generate=True,
                           pp=pp).export(tmp_path / f"pp{pp}")
        m = read_manifest(art / "rank1")
        assert (m.parallel.pp, m.parallel.stage) == (pp, 1) and len(m.generation.layers) == 4 // pp
        funcs = [{k.func for k in read_manifest(art / f"rank{s}").generation.program.kernels.values()
                  if k.route == "p2p"} for s in range(pp)]
        assert funcs == [{"send"}] + [{"send", "recv"}] * (pp - 2) + [{"recv"}]
        got = _run_ranks(art, pp)
        assert got["token_ids"] == want


def test_pipeline_micro_batches_give_the_whole_models_sampled_tokens(tmp_path):
    """PP = 2 with micro-batches in flight (runtime/engine/pp_loop.py): five prompts of different
    lengths dealt into 1 (lockstep), 2 and 3 groups, sampled at temperature 0.8 with a seed. The
    last stage samples and sends the tokens on the host channel, so every stage's loop schedules
    alike; the tokens are the whole model's, sampled in one process with the same seeds."""
    model = tiny_causal_lm("llama", layers=4)
    ids = (torch.randint(3, VOCAB, (1, 8)),)
    prompts = [list(map(int, torch.randint(3, VOCAB, (n,)))) for n in (3, 17, 9, 30, 5)]
    one = llmc.compile(model, ids, dim_bounds=BOUNDS, generate=True)
    want = [o.token_ids for o in one.generate(prompts, max_new_tokens=12, temperature=0.8, seed=7,
                                                 stop_token_ids=())]
    art = llmc.compile(model, ids, dim_bounds=BOUNDS, generate=True, pp=2).export(tmp_path / "pp2")
    for groups in (1, 2, 3):
        got = _run_ranks(art, 2, ["--temperature", "0.8", "--seed", "7", "--micro-batches", str(groups)], prompts)
        assert got["token_ids"] == want, groups


def test_tp2_over_an_int8_kv_cache(llama, tmp_path):
    """kv_cache_dtype="int8" with tp=2: each rank's cache holds its KV heads' uint8 rows (codes +
    scale, the row unsplit), and the ranks' greedy tokens are the whole int8-cache model's."""
    ids = (torch.randint(3, VOCAB, (1, 8)),)
    one = llmc.compile(llama, ids, dim_bounds=BOUNDS, generate=True, kv_cache_dtype="int8")
    want = [o.token_ids for o in one.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())]
    art = llmc.compile(llama, ids, dim_bounds=BOUNDS, generate=True, tp=2, kv_cache_dtype="int8").export(tmp_path / "a")
    g = read_manifest(art / "rank1").generation
    assert g.kv_dtype == "int8" and g.program.inputs[6].shape[3:] == (2, g.layers[0].head_dim + 4)  # 4 heads / 2
    assert _run_ranks(art, 2)["token_ids"] == want


def test_tensor_and_pipeline_parallel_together(tmp_path):
    """tp=2 x pp=2: the step sharded for 2, then cut into 2 stages; rank = stage * 2 + shard. Each
    stage's shards all-reduce within the stage, each shard sends the residual stream to the same
    shard of the next stage, and the last stage's first shard broadcasts the logits: the whole
    model's greedy tokens from 4 processes."""
    model = tiny_causal_lm("llama", layers=4, num_key_value_heads=4)
    ids = (torch.randint(3, VOCAB, (1, 8)),)
    one = llmc.compile(model, ids, dim_bounds=BOUNDS, generate=True)
    want = [o.token_ids for o in one.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())]
    art = llmc.compile(model, ids, dim_bounds=BOUNDS, generate=True, tp=2, pp=2).export(tmp_path / "tp2pp2")
    for rank in range(4):
        m = read_manifest(art / f"rank{rank}")
        assert (m.parallel.tp, m.parallel.pp, m.parallel.stage, m.parallel.rank) == (2, 2, rank // 2, rank % 2)
        routes = {k.route for k in m.generation.program.kernels.values()}
        assert {"coll", "p2p"} <= routes
    shard0 = load_weights(art / "rank0", read_manifest(art / "rank0"))
    shard1 = load_weights(art / "rank1", read_manifest(art / "rank1"))
    assert any(not np.array_equal(shard0[k], shard1[k]) for k in shard0)  # the shards' own halves
    got = _run_ranks(art, 4)
    assert got["token_ids"] == want
