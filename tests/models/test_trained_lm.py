"""llmc's own trained model (tools/train_tiny_llama.py: a small Llama trained on the Python
standard library, real BPE tokenizer): text in, text out, greedy tokens identical to
transformers' generate. Trains once per machine (about 3 minutes on 2 cores), then cached."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

import llmc

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
from train_tiny_llama import trained_model  # noqa: E402

PROMPTS = ["import os\n", "def __init__(self, name, value=None):\n    ", "class Stack:\n    \"\"\"A stack.\"\"\"\n\n"]


@pytest.fixture(scope="module")
def trained():
    folder = trained_model(log=lambda msg: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3]])},
                      dim_bounds={"batch": (1, 2), "seq": (1, 256)}, generate=True,
                      tokenizer=str(folder / "tokenizer.json"))
    return folder, model, tok, cm


def test_text_generation_equals_transformers(trained):
    _, model, tok, cm = trained
    out = cm.generate(PROMPTS, max_new_tokens=32, stop_token_ids=())  # text prompts of three lengths, one batch
    for p, o in zip(PROMPTS, out):
        ids = tok(p, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert o.token_ids == ref
        assert o.text == tok.decode(ref)
    assert any(word in "".join(o.text for o in out) for word in ("self", "def", "return", "import"))  # it learned


def test_default_stop_is_the_models_eos(trained):
    _, model, tok, cm = trained
    out = cm.generate(["x = 1\n"], max_new_tokens=200, temperature=1.0, seed=3)
    eos = tok.eos_token_id
    assert cm.generation.section["stop_token_ids"] == [eos]
    o = out[0]
    assert (o.finish_reason == "stop" and o.token_ids[-1] == eos) or \
        (o.finish_reason == "length" and eos not in o.token_ids)


def test_cli_generate_prints_text(trained, tmp_path):
    import subprocess

    folder, model, tok, _ = trained
    art = tmp_path / "tiny.llmc"
    r = subprocess.run([sys.executable, "-m", "llmc", "compile", str(folder), "-o", str(art), "--seq-len", "128"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "llmc", "generate", str(art), "--prompt", PROMPTS[1],
                        "--max-new-tokens", "16", "--stop-ids", ""], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    ref = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert r.stdout.rstrip("\n") == tok.decode(ref).rstrip("\n")
    r = subprocess.run([sys.executable, "-m", "llmc", "inspect", str(art)], capture_output=True, text=True, timeout=300)
    assert "tokenizer tokenizer.json" in r.stdout and "context 128" in r.stdout, r.stdout


def test_concurrent_callers_train_the_model_once(tmp_path, monkeypatch):
    """Parallel test workers asking for the trained model at once: one trains, the others wait on
    the folder's lock and take its result (the training itself is replaced by a stand-in here)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import train_tiny_llama

    runs, lock = [], threading.Lock()

    def fake_train(out, log=print):
        with lock:
            runs.append(out)
        time.sleep(0.5)  # long enough for the second caller to arrive while the first trains
        out.mkdir(parents=True)
        (out / "recipe.json").write_text("{}")
        return out

    monkeypatch.setattr(train_tiny_llama, "train", fake_train)
    folder = tmp_path / "model"
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: train_tiny_llama.trained_model(folder), range(2)))
    assert got == [folder, folder] and len(runs) == 1
