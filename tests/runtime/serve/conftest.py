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


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory) -> pathlib.Path:
    import torch

    import llmc
    from train_tiny_llama import trained_model

    folder = trained_model(log=lambda msg: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3]])},
                      dim_bounds={"batch": (1, 2), "seq": (1, 256)}, generate=True,
                      tokenizer=str(folder / "tokenizer.json"))
    return cm.export(tmp_path_factory.mktemp("serve") / "tiny.llmc")


@pytest.fixture(scope="session")
def offline(trained_artifact):
    """A second load of the artifact for references: offline llm.generate, one request at a time."""
    import llmc

    return llmc.load(trained_artifact)
