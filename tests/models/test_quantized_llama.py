"""A tiny random Llama compiled with --quant int8 / int4: the CPU kernels against the numpy
reference of the quantized graph (dequantized weights), the artifact (packed uint8/int8
weights in safetensors) through the runtime alone, and generation through the step function."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmc
from llmc.compiler.interpreter import interpret
from llmc.compiler.ops import Op

transformers = pytest.importorskip("transformers")

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", params=[("int8", None, 0.02), ("int4", 32, 0.25), ("w8a8", None, 0.05),
                                        ("fp8", None, 0.1)], ids=["int8", "int4_g32", "w8a8", "fp8"])
def compiled(request, model):
    quant, group, tol = request.param
    ids = torch.randint(0, VOCAB, (1, 12))
    cm = llmc.compile(model, (ids,), dim_bounds={"batch": (1, 2), "seq": (1, 64)}, quant=quant, group=group,
                      generate=True)
    return quant, tol, cm


def test_kernels_match_the_dequantized_reference(model, compiled):
    quant, tol, cm = compiled
    g = cm.program.graph
    q = [n for n in g.nodes() if n.op is Op.QMATMUL]
    assert len(q) == 8 and all(n.attrs.bits == (4 if quant == "int4" else 8) for n in q)  # qkv, o, gate_up, down x 2
    assert sum(n.op is Op.MATMUL for n in g.nodes()) == 1  # the LM head stays float
    ids = np.random.default_rng(5).integers(0, VOCAB, (2, 23))
    got = cm(ids)[0]
    want = interpret(g, [ids])[0]  # numpy, float64 math over the dequantized weights
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        fp = model(torch.from_numpy(ids)).logits.numpy()
    rel = np.linalg.norm(got - fp) / np.linalg.norm(fp)
    assert rel < tol, rel  # quantization error, not a wrong kernel
    assert cm.manifest["quantization"]["scheme"] == quant


def test_artifact_stores_packed_weights_and_runs_without_the_compiler(compiled, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.numpy import load_file

    quant, _, cm = compiled
    art = cm.export(tmp_path / "q.llmc")
    ws = load_file(str(art / "weights.safetensors"))
    packed = [a for k, a in ws.items() if k.endswith(".qweight")]
    assert packed and all(a.dtype == (np.int8 if quant in ("int8", "w8a8") else np.uint8) for a in packed)
    ids = np.random.default_rng(6).integers(0, VOCAB, (1, 9))
    np.save(tmp_path / "ids.npy", ids)
    code = ("import sys, numpy as np, llmc; m = llmc.load(sys.argv[1]); "
            "np.save(sys.argv[3], m(input_ids=np.load(sys.argv[2]))[0]); "
            "assert 'torch' not in sys.modules and 'libtvm_compiler' not in open('/proc/self/maps').read()")
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}  # as a user's process
    r = subprocess.run([sys.executable, "-c", code, str(art), str(tmp_path / "ids.npy"), str(tmp_path / "out.npy")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), cm(ids)[0], rtol=1e-5, atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "llmc", "inspect", str(art)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"quantization: {quant}" in r.stdout and "kept" in r.stdout, r.stdout + r.stderr


def test_generate_through_the_quantized_step_function(compiled):
    """Greedy tokens from the step function (paged KV cache, quantized matmuls; W8A8 / FP8 scale
    each token's activations by their own max, so a step's rows stay independent) are the argmax
    of the quantized forward's logits at every position."""
    _, _, cm = compiled
    prompt = [5, 17, 3, 99]
    out = cm.generate([prompt], max_new_tokens=8, stop_token_ids=())[0].token_ids
    assert len(out) == 8
    logits = cm(np.array([prompt + out], np.int64))[0][0]
    assert [int(t) for t in logits[len(prompt) - 1:-1].argmax(-1)] == out


def test_tied_lm_head_and_embedding_share_one_packed_table(tmp_path):
    """quant_lm_head on a tied Llama: the LM head is a QMATMUL and the embedding a QTAKE over the
    same int4 table, stored once; the CPU kernels equal the reference of the quantized graph,
    the forward and the step function (decode through QTAKE) agree, and no float table is left."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    cm = llmc.compile(model, (ids,), dim_bounds={"batch": (1, 2), "seq": (1, 64)}, quant="int4", group=32,
                      quant_lm_head=True, generate=True)
    g = cm.program.graph
    ops = [n.op for n in g.nodes()]
    assert ops.count(Op.QTAKE) == 1 and ops.count(Op.QMATMUL) == 9 and Op.MATMUL not in ops and Op.TAKE not in ops
    assert not any(a.dtype == np.float32 and a.shape == (VOCAB, 64) for a in g.params.values())
    x = np.random.default_rng(6).integers(0, VOCAB, (2, 17))
    got = cm(x)[0]
    np.testing.assert_allclose(got, interpret(g, [x])[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        fp = model(torch.from_numpy(x)).logits.numpy()
    assert np.linalg.norm(got - fp) / np.linalg.norm(fp) < 0.3
    q = cm.manifest["quantization"]
    assert q["kept"] == [] and q["bytes_after"] < 0.2 * q["bytes_before"] and q["quantized_embeddings"] == 1
    llm = llmc.load(cm.export(tmp_path / "tied.llmc"))
    prompt = x[0, :9].tolist()
    out = llm.generate([prompt], max_new_tokens=5)[0].token_ids
    full = prompt + out[:-1]
    # each generated token is the forward's argmax over the same (quantized) model
    assert out == [int(t) for t in np.argmax(llm(input_ids=np.array([full]))[0][0, len(prompt) - 1:], -1)]
