"""Shared by the serving tests: llmc's trained tiny Llama (tools/train_tiny_llama.py, a real
BPE tokenizer) compiled once per session, and real uvicorn servers on loopback ports."""
from __future__ import annotations

import pathlib
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "tools"))


def _compile_trained(out: pathlib.Path, **kw) -> pathlib.Path:
    import torch

    import llmc
    from train_tiny_llama import trained_model

    folder = trained_model(log=lambda msg: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3]])},
                      dim_bounds={"batch": (1, 2), "seq": (1, 256)}, generate=True,
                      tokenizer=str(folder / "tokenizer.json"), **kw)
    return cm.export(out)


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory) -> pathlib.Path:
    return _compile_trained(tmp_path_factory.mktemp("serve") / "tiny.llmc")


@pytest.fixture(scope="session")
def int8_kv_artifact(tmp_path_factory) -> pathlib.Path:
    """The same model with an int8 KV cache (codes + a scale per token and head)."""
    return _compile_trained(tmp_path_factory.mktemp("kv8") / "tiny_kv8.llmc", kv_cache_dtype="int8")


@pytest.fixture(scope="session")
def drive_engine():
    """run(engine, [(prompt, max_new_tokens), ...]) -> each request's tokens: every request queued
    before the engine starts (so the schedule does not depend on arrival timing), then the engine
    runs them all and is shut down."""
    import queue

    from llmc.runtime.engine.sampler import SamplingParams

    def run(engine, requests) -> list[list[int]]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        for i, (prompt, new) in enumerate(requests):
            engine.submit(prompt, SamplingParams(max_new_tokens=new), lambda ev, i=i: events.put((i, ev)))
        engine.start()
        got = [[] for _ in requests]
        for _ in range(sum(new for _, new in requests)):
            i, ev = events.get(timeout=300)
            got[i].append(ev.token_id)
        engine.shutdown()
        return got

    return run


@pytest.fixture(scope="session")
def offline(trained_artifact):
    """A second load of the artifact for references: offline llm.generate, one request at a time."""
    import llmc

    return llmc.load(trained_artifact)
