"""The `llmc` command through a subprocess: compile a bundled example, inspect, run,
and the errors a user can cause."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmc.compiler.frontend.hf_models import tiny_model


def llmc(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "llama.llmc"
    r = llmc("compile", "tiny-llama", "-o", str(out), "--seq-len", "32", "--batch", "2", "--report")
    assert r.returncode == 0, r.stderr
    assert "attention" in r.stdout and "per transformer layer" in r.stdout
    # where each fused op came from: the passes fuse Llama's norms, the frontend emits SDPA
    assert "rms_norm 5 (0 from the frontend, 5 fused by passes)" in r.stdout, r.stdout
    assert "attention 2 (2 from the frontend, 0 fused by passes)" in r.stdout
    assert "attention: 0 fused by passes, 0 left (2 from the frontend)" in r.stdout
    assert "[llmc]" in r.stderr  # progress lines
    return out


def test_inspect(artifact):
    r = llmc("inspect", str(artifact))
    assert r.returncode == 0, r.stderr
    for word in ("input  input_ids: int64[batch, seq]", "output logits", "kernels:", "weights:", "seq in [1, 32]",
                 "blas:gemm (blas gemm (W^T))", "attn:attention (library attention", "libraries: tvm=kernels.so, gemm=gemm.so"):
        assert word in r.stdout, r.stdout


def test_bundled_decoder_generates_like_transformers(artifact):
    """tiny-llama is compiled with an attention mask input; its step function comes from a
    second capture with the ids alone."""
    r = llmc("generate", str(artifact), "--ids", "3,4,5,6,7", "--max-new-tokens", "12", "--stop-ids", "")
    assert r.returncode == 0, r.stderr
    model, _ = tiny_model("llama")
    want = model.generate(torch.tensor([[3, 4, 5, 6, 7]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 5:].tolist()
    assert [int(t) for t in r.stdout.split()] == want


def test_no_blas_builds_gemms_with_tvm(tmp_path):
    out = tmp_path / "m.llmc"
    r = llmc("compile", "tiny-llama", "-o", str(out), "--seq-len", "16", "--batch", "1", "--no-blas")
    assert r.returncode == 0, r.stderr
    r = llmc("inspect", str(out))
    assert r.returncode == 0 and "blas:" not in r.stdout and "tvm (matmul)" in r.stdout, r.stdout
    assert "batch in [1, 1]" in r.stdout, r.stdout  # --batch 1: exported as [1, 2] (torch needs min < max)


def test_bad_thread_count_is_a_clear_error(artifact, tmp_path):
    np.save(tmp_path / "ids.npy", np.ones((1, 4), np.int64))
    env = dict(os.environ, LLMC_NUM_THREADS="two")
    env.pop("TVM_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "run", str(artifact), "--input", f"input_ids={tmp_path / 'ids.npy'}"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and "LLMC_NUM_THREADS" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_run_matches_torch(artifact, tmp_path):
    model, _ = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    r = llmc("run", str(artifact), "--input", f"input_ids={tmp_path / 'ids.npy'}",
             "--input", f"attention_mask={tmp_path / 'mask.npy'}", "-o", str(tmp_path / "out.npz"))
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    got = np.load(tmp_path / "out.npz")["logits"]
    assert np.abs(got - ref).max() <= 1e-4


def test_errors_are_clear(artifact, tmp_path):
    r = llmc("compile", "no-such-model", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown source 'no-such-model'" in r.stderr
    r = llmc("compile", "tiny-llama", "-o", str(tmp_path / "x"), "--target", "tpu")
    assert r.returncode == 2 and "unknown target" in r.stderr
    assert not (tmp_path / "x").exists()
    np.save(tmp_path / "big.npy", np.zeros((2, 40), np.int64))
    r = llmc("run", str(artifact), "--input", f"input_ids={tmp_path / 'big.npy'}",
             "--input", f"attention_mask={tmp_path / 'big.npy'}")
    assert r.returncode == 2 and "outside its bounds" in r.stderr
    r = llmc("run", str(tmp_path / "missing.llmc"))
    assert r.returncode == 2 and "not an llmc artifact" in r.stderr


def test_module_function_source(tmp_path):
    out = tmp_path / "mlp.llmc"
    env_path = str(__import__("pathlib").Path(__file__).parents[1] / "helpers")
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", "cli_models:make", "-o", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=env_path + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert r.returncode == 0, r.stderr
    import cli_models

    model, (x,) = cli_models.make()
    x = torch.randn(3, 7, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    r = llmc("run", str(out), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.npz"))
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(np.load(tmp_path / "o.npz")["output"] - want).max() <= 1e-4


def test_hugging_face_folder_source(tmp_path):
    model, _ = tiny_model("qwen2")
    folder = tmp_path / "qwen2-hf"
    model.save_pretrained(folder)  # config.json + model.safetensors
    r = llmc("compile", str(folder), "-o", str(tmp_path / "q.llmc"), "--seq-len", "32", "--batch", "2")
    assert r.returncode == 0, r.stderr
    r = llmc("inspect", str(tmp_path / "q.llmc"))
    assert "output logits" in r.stdout
    # a causal LM folder compiles to a generation artifact: the forward and the step function
    for word in ("entry points: forward", "step inputs: tokens[tokens]", "kv cache: 2 layers", "pages of 16 tokens",
                 "context 32"):
        assert word in r.stdout, r.stdout
    r = llmc("generate", str(tmp_path / "q.llmc"), "--ids", "5,6,7,8", "--max-new-tokens", "10", "--stop-ids", "")
    assert r.returncode == 0, r.stderr
    want = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 4:].tolist()
    assert [int(t) for t in r.stdout.split()] == want, (r.stdout, want)
    assert "tokens/s" in r.stderr
    for args, msg in [(["--ids", "5,x"], "comma-separated"), (["--prompt", "hello"], "no tokenizer"),
                      (["--ids", "5", "--max-new-tokens", "0"], "max_new_tokens"), (["--ids", "-3"], "vocabulary")]:
        r = llmc("generate", str(tmp_path / "q.llmc"), *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = llmc("compile", str(folder), "-o", str(tmp_path / "f.llmc"), "--seq-len", "32", "--no-generate")
    assert r.returncode == 0, r.stderr
    r = llmc("generate", str(tmp_path / "f.llmc"), "--ids", "5")
    assert r.returncode == 2 and "no step function" in r.stderr


def test_onnx_file_source(tmp_path):
    from onnx_export import export_onnx, ort_session

    path = tmp_path / "bert.onnx"
    export_onnx("bert", "torchscript", str(path))
    # --dim names a dim of the file (here the exporter's "seq"), and wins over --seq-len
    r = llmc("compile", str(path), "-o", str(tmp_path / "bert.llmc"), "--seq-len", "64", "--dim", "seq=1:32",
             "--batch", "2", "--report")
    assert r.returncode == 0, r.stderr
    assert "seq in [1, 32]" in llmc("inspect", str(tmp_path / "bert.llmc")).stdout
    assert "layer_norm" in r.stdout and "attention" in r.stdout
    ids = np.random.default_rng(0).integers(0, 100, (2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    r = llmc("run", str(tmp_path / "bert.llmc"), "--input", f"input_ids={tmp_path / 'ids.npy'}",
             "--input", f"attention_mask={tmp_path / 'mask.npy'}", "-o", str(tmp_path / "o.npz"))
    assert r.returncode == 0, r.stderr
    want = ort_session(str(path)).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert np.abs(np.load(tmp_path / "o.npz")["out"] - want).max() <= 1e-4
    (tmp_path / "junk.onnx").write_bytes(b"this is not a model")
    r = llmc("compile", str(tmp_path / "junk.onnx"), "-o", str(tmp_path / "junk.llmc"))
    assert r.returncode == 2 and "junk.onnx" in r.stderr and not (tmp_path / "junk.llmc").exists()
