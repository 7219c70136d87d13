"""The data-parallel front's pieces on their own: the router's least-outstanding-tokens
choice and its books, the request pricing against the tokenizer, the metrics merge, where
each replica runs, and the CLI's refusals before any process starts."""
from __future__ import annotations

import json
import random
import signal

import pytest

from llmc.cli import main
from llmc.runtime.serve.dp_cost import RequestCost
from llmc.runtime.serve.dp_metrics import merge
from llmc.runtime.serve.replica_process import describe_exit, placement
from llmc.runtime.serve.router import Router


def test_least_outstanding_tokens_wins():
    r = Router(3)
    for i in range(3):
        r.set_up(i, True)
    a = r.admit(r.choose(), 100, 50)  # replica 0: 150
    assert a.replica == 0
    b = r.admit(r.choose(), 10, 10)  # the idle ones first: replica 1: 20
    assert b.replica == 1
    assert r.choose() == 2  # still idle
    c = r.admit(2, 30, 30)  # 60
    assert r.choose() == 1  # 20 < 60 < 150
    a.produced(1)  # replica 0: prompt read, 49 left
    assert r.loads[0].outstanding == 49
    assert r.choose() == 1
    b.produced(5)  # 5 left on replica 1
    c.close()  # replica 2 empty again
    assert r.choose() == 2
    assert [x.outstanding for x in r.loads] == [49, 5, 0]


def test_random_books_balance_against_a_recount():
    rng = random.Random(0)
    r = Router(4)
    for i in range(4):
        r.set_up(i, True)
    open_ = []
    for _ in range(500):
        if open_ and rng.random() < 0.4:
            t = open_.pop(rng.randrange(len(open_)))
            if rng.random() < 0.5:
                t.produced(rng.randrange(1, 5))
                open_.append(t)
            else:
                t.close()
                t.close()  # idempotent
        else:
            want = min(range(4), key=lambda i: sum(t.cost for t in open_ if t.replica == i))
            i = r.choose()
            assert sum(t.cost for t in open_ if t.replica == i) == sum(t.cost for t in open_ if t.replica == want)
            open_.append(r.admit(i, rng.randrange(1, 100), rng.randrange(0, 64)))
        for i in range(4):
            mine = [t for t in open_ if t.replica == i]
            assert r.loads[i].outstanding == sum(t.cost for t in mine)
            assert r.loads[i].in_flight == len(mine)


def test_ties_go_round_robin_and_down_replicas_are_skipped():
    r = Router(3)
    for i in range(3):
        r.set_up(i, True)
    picks = []
    for _ in range(6):
        t = r.admit(r.choose(), 0, 0)
        picks.append(t.replica)
        t.close()
    assert picks == [0, 1, 2, 0, 1, 2]
    r.set_up(1, False)
    assert r.order() == [0, 2] or r.order() == [2, 0]
    assert r.choose(exclude={0, 2}) is None
    t = r.admit(0, 5, 5)
    assert r.drop_all(0) == [t] and r.loads[0].outstanding == 0 and r.loads[0].in_flight == 0
    t.produced(3)  # a closed ticket no longer moves the books
    assert r.loads[0].outstanding == 0


def test_request_cost_counts_the_replicas_tokens(trained_artifact, offline):
    cost = RequestCost.from_artifact(trained_artifact)
    prompt = "def __init__(self, name):\n"
    n_prompt = len(offline.encode(prompt, 0))
    c = cost.of("/v1/completions", json.dumps({"model": "m", "prompt": prompt, "max_tokens": 7}).encode())
    assert (c.prompt_tokens, c.max_tokens) == (n_prompt, 7)
    c = cost.of("/v1/completions", json.dumps({"model": "m", "prompt": [[1, 2, 3], [4, 5]], "n": 2}).encode())
    assert (c.prompt_tokens, c.max_tokens) == (5, 16 * 2 * 2)  # OpenAI's default max_tokens, per choice
    limit = offline.limits.max_context
    msgs = [{"role": "user", "content": "import os"}]
    c = cost.of("/v1/chat/completions", json.dumps({"model": "m", "messages": msgs}).encode())
    from llmc.runtime.serve.chat import DEFAULT_TEMPLATE, ChatTemplate

    eos = offline.tokenizer.decode([offline.spec.stop_token_ids[0]], skip_special_tokens=False)
    n_chat = len(offline.encode(ChatTemplate(DEFAULT_TEMPLATE, eos_token=eos).render(msgs), 0))
    assert (c.prompt_tokens, c.max_tokens) == (n_chat, limit - n_chat)  # no max_tokens: the rest of the context
    for bad in (b"{not json", b'{"model": "m"}', b'{"model": "m", "prompt": "x", "max_tokens": "many"}'):
        c = cost.of("/v1/completions", bad)  # the replica's 400 will say what is wrong
        assert (c.prompt_tokens, c.max_tokens) == (0, 0)


def test_metrics_merge_sums_samples_and_keeps_heads_once():
    a = ('# HELP llmc_x things\n# TYPE llmc_x counter\nllmc_x 3\nllmc_h_bucket{le="0.1"} 1\n'
         'llmc_p{mode="swap"} 2\nllmc_g 0.5\n')
    b = '# HELP llmc_x things\n# TYPE llmc_x counter\nllmc_x 4\nllmc_h_bucket{le="0.1"} 2\nllmc_g 0.25\n'
    out = merge([a, b]).splitlines()
    assert out.count("# HELP llmc_x things") == 1
    assert "llmc_x 7" in out and 'llmc_h_bucket{le="0.1"} 3' in out and 'llmc_p{mode="swap"} 2' in out
    assert "llmc_g 0.75" in out
    assert merge([]) == ""


def test_placement_one_gpu_each_or_shared_cores():
    gpus = placement(2, "cuda", None, parent_env={})
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in gpus] == ["0", "1"]
    gpus = placement(2, "cuda", [1, 0], parent_env={"CUDA_VISIBLE_DEVICES": "4,6"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in gpus] == ["6", "4"]
    groups = placement(2, "cuda", None, parent_env={}, gpus_per_replica=2)  # --dp 2 over a --tp 2 artifact
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in groups] == ["0,1", "2,3"]
    groups = placement(2, "cuda", [3, 2, 1, 0], parent_env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, gpus_per_replica=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in groups] == ["7,6", "5,4"]
    cpus = placement(2, "cpu", None, parent_env={})
    assert all(int(e["LLMC_NUM_THREADS"]) >= 1 for e, _ in cpus)
    assert placement(2, "cpu", None, parent_env={"LLMC_NUM_THREADS": "3"})[0][0].get("LLMC_NUM_THREADS") is None
    from llmc import LLMCError

    for args, env in (((2, "cuda", [0]), {}), ((2, "cuda", [1, 1]), {}),
                      ((2, "cuda", [0, 2]), {"CUDA_VISIBLE_DEVICES": "3,4"}), ((2, "cpu", [0, 1]), {}),
                      ((0, "cpu", None), {})):
        with pytest.raises(LLMCError):
            placement(*args, parent_env=env)
    with pytest.raises(LLMCError, match=r"names 3 GPUs for --dp 2 replicas of 2 GPU\(s\) each"):
        placement(2, "cuda", [0, 1, 2], parent_env={}, gpus_per_replica=2)


def test_exit_descriptions():
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def test_cli_refuses_bad_replica_options_before_starting(trained_artifact, tmp_path, capsys):
    assert main(["serve", str(trained_artifact), "--dp", "0"]) == 2
    assert "--dp must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(trained_artifact), "--dp", "2", "--devices", "0,1"]) == 2
    assert "--devices is for GPU artifacts" in capsys.readouterr().err
    assert main(["serve", str(trained_artifact), "--dp", "2", "--devices", "a,b"]) == 2
    assert "expected GPU indices" in capsys.readouterr().err
    assert main(["serve", str(trained_artifact), "--dp", "2", "--max-restarts", "-1"]) == 2
    assert "--max-restarts must be >= 0" in capsys.readouterr().err
    assert main(["serve", str(trained_artifact), "--ray", "--dp", "3", "--ray-max-replicas", "2"]) == 2
    assert "below --dp 3" in capsys.readouterr().err
    assert main(["serve", str(trained_artifact), "--ray-max-replicas", "4"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing.llmc"), "--dp", "2"]) == 2
    assert "not an llmc artifact" in capsys.readouterr().err
