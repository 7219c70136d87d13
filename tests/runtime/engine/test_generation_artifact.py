"""A generation artifact (forward + step function) as the loader sees it: written once,
then damaged or lied about in each way below; every case must be an ArtifactError at load
(never a crash or a half-loaded model), and the pristine copy must generate correctly."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import llmc
from llmc.runtime.manifest import canonical_checksum

pytest.importorskip("transformers")
from causal_lms import VOCAB, hf_greedy, tiny_causal_lm  # noqa: E402

M = "manifest.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    model = tiny_causal_lm("qwen2", layers=1)
    cm = llmc.compile(model, (), {"input_ids": torch.randint(3, VOCAB, (1, 6))},
                      dim_bounds={"batch": (1, 2), "seq": (1, 40)}, generate=True)
    return model, cm.export(tmp_path_factory.mktemp("gen") / "q.llmc")


def _lie(edit, rehash: str | None = None):
    def run(d):
        m = json.loads((d / M).read_text())
        edit(m, d)
        if rehash:
            data = (d / rehash).read_bytes()
            m["files"]["entries"][rehash] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        m = {k: v for k, v in m.items() if k != "checksum"}
        m["checksum"] = canonical_checksum(m)
        (d / M).write_text(json.dumps(m))
    return run


def _g(m):
    return m["generation"]


def _kv_kernel(m):
    return next(k for k in _g(m)["program"]["kernels"].values() if k.get("route") == "kv")


CASES = {
    "step library missing": lambda d: (d / "step_kernels.so").unlink(),
    "step library truncated": lambda d: (d / "step_kernels.so").write_bytes((d / "step_kernels.so").read_bytes()[:999]),
    "step library not in files": _lie(lambda m, d: m["files"]["entries"].pop("step_kernels.so")),
    "step library outside the folder": _lie(lambda m, d: _g(m).update(library="../step_kernels.so")),
    "generation section newer": _lie(lambda m, d: _g(m).update(version=2)),
    "an unknown required section": _lie(lambda m, d: m.update(
        generation2=dict(_g(m), required=True))),
    "kv page size disagrees with the caches": _lie(lambda m, d: _g(m)["kv"].update(page_size=8)),
    "kv layer count disagrees": _lie(lambda m, d: _g(m)["kv"]["layers"].append([2, 8, 0])),
    "kv head dim disagrees": _lie(lambda m, d: _g(m)["kv"]["layers"][0].__setitem__(1, 16)),
    "kv dtype unknown": _lie(lambda m, d: _g(m)["kv"].update(dtype="int8")),
    "step input renamed": _lie(lambda m, d: _g(m)["program"]["inputs"][1].update(name="pos")),
    "vocab disagrees with the logits": _lie(lambda m, d: _g(m)["limits"].update(vocab=VOCAB + 1)),
    "stop id outside the vocab": _lie(lambda m, d: _g(m).update(stop_token_ids=[VOCAB])),
    "limits zero": _lie(lambda m, d: _g(m)["limits"].update(max_tokens=0)),
    "kv route unknown function": _lie(lambda m, d: _kv_kernel(m).update(func="flash")),
    "kv route scalars missing window": _lie(lambda m, d: _kv_kernel(m).update(scalars=[0.3])),
    "kv route negative window": _lie(lambda m, d: _kv_kernel(m).update(scalars=[0.3, -1])),
    "kv route tensor order": _lie(lambda m, d: _kv_kernel(m)["tensors"].reverse()),
    "kv route in a cuda artifact's clothing": _lie(lambda m, d: _kv_kernel(m).update(route="shim")),
    "weights count ignores the step's weights": _lie(lambda m, d: m["weights"].update(count=m["weights"]["count"] - 1)),
    "tokenizer named but absent": _lie(lambda m, d: _g(m).update(tokenizer="tokenizer.json")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_damaged_generation_artifact_is_an_artifact_error(pristine, tmp_path, name):
    d = tmp_path / "a.llmc"
    shutil.copytree(pristine[1], d)
    CASES[name](d)
    with pytest.raises(llmc.ArtifactError):
        llmc.load(d)


def test_pristine_generates_like_transformers(pristine):
    model, path = pristine
    llm = llmc.load(path)
    prompts = [[5, 9, 11], list(range(3, 30))]
    assert [g.token_ids for g in llm.generate(prompts, max_new_tokens=12, stop_token_ids=())] == \
        [hf_greedy(model, p, 12) for p in prompts]
    with pytest.raises(llmc.LLMCError, match="unknown options"):
        llmc.load(path, graphs=True)


def test_greedy_steps_take_only_the_argmax(pristine):
    """Greedy decoding asks the step for each row's argmax (computed on the device on a GPU) and
    gives transformers' greedy tokens; sampling, or a repetition penalty, brings the logits back."""
    model, path = pristine
    llm = llmc.load(path)
    calls = {"greedy": 0, "logits": 0}
    step_greedy, step_logits = llm.step_greedy, llm.step_logits

    def counted(kind, fn):
        def call(inputs):
            calls[kind] += 1
            return fn(inputs)
        return call

    llm.step_greedy, llm.step_logits = counted("greedy", step_greedy), counted("logits", step_logits)
    prompts = [[5, 9, 11], list(range(3, 20))]
    want = [hf_greedy(model, p, 6) for p in prompts]
    assert [g.token_ids for g in llm.generate(prompts, max_new_tokens=6, stop_token_ids=())] == want
    assert calls["greedy"] > 0 and calls["logits"] == 0
    calls.update(greedy=0, logits=0)
    llm.generate(prompts, max_new_tokens=6, temperature=0.8, seed=1, stop_token_ids=())
    assert calls["logits"] > 0 and calls["greedy"] == 0
    calls.update(greedy=0, logits=0)
    llm.generate(prompts, max_new_tokens=6, repetition_penalty=1.3, stop_token_ids=())
    assert calls["logits"] > 0 and calls["greedy"] == 0
