"""End to end on the GPU: artifacts compiled for CUDA on a host without a GPU, run by the
runtime alone, against torch on the GPU in the same dtype.

Two halves, because the GPU machine has no TVM compiler:

    python tests/models/test_gpu_models.py --prepare gpu_art/models     # CPU host: compile
    LLMC_GPU_MODELS=gpu_art/models pytest -m gpu tests/models/test_gpu_models.py   # GPU machine

`--prepare` writes, per case, the artifact, the Hugging Face model folder (tiny models:
config + weights, so torch on the GPU runs the very same weights), the inputs and a torch
float32 CPU reference. The real all-MiniLM-L6-v2 travels without its HF folder (the
artifact is ~45 MB): its check is the sentence-embedding cosine against the CPU reference.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

CASES = {  # name: (tiny model, dtype, with padding mask)
    "llama_bf16": ("llama", "bfloat16", True),
    "llama_fp16_causal": ("llama", "float16", False),
    "qwen2_bf16": ("qwen2", "bfloat16", True),
    "gpt2_fp16": ("gpt2", "float16", True),
    "bert_bf16": ("bert", "bfloat16", True),
    "minilm_fp16": ("minilm", "float16", True),
}
SHAPES = [(2, 16), (1, 37), (3, 64)]  # (batch, seq): several plans in one executor
BOUNDS = {"batch": (1, 4), "seq": (1, 64)}
DECODERS = {"llama", "qwen2", "gpt2", "mistral"}


def _inputs(vocab: int, b: int, s: int, seed: int, mask: bool) -> dict:
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(3, min(vocab, 1000), (b, s)).astype(np.int64)}
    if mask:
        m = np.ones((b, s), np.int64)
        if b > 1:
            m[1, s - 3:] = 0  # right padding in the second row
        feed["attention_mask"] = m
    return feed


def prepare(out: pathlib.Path, arch: str = "sm_90") -> None:
    import shutil

    import torch

    from llmc.api import CompileOptions, capture, compile_graph
    from llmc.compiler.frontend.hf_models import tiny_model

    out.mkdir(parents=True, exist_ok=True)
    shim = None
    for case, (name, dtype, mask) in CASES.items():
        model, kw = tiny_model(name)
        model = model.to(getattr(torch, dtype))
        if not mask:
            kw.pop("attention_mask")
        opts = CompileOptions(target=f"cuda:{arch}", dim_bounds=BOUNDS, progress=print)
        cm = compile_graph(capture(model, (), kw, opts), opts)
        d = out / case
        if d.exists():
            shutil.rmtree(d)
        art = cm.export(d / "artifact.llmc")
        if (art / "shim.so").exists():  # one shim copy for all cases (the working tree must stay small)
            if shim is None:
                shim = out / "shim.so"
                shutil.copy2(art / "shim.so", shim)
            (art / "shim.so").unlink()
            (art / "shim.so").symlink_to(os.path.relpath(shim, art))
        if name != "minilm":
            model.save_pretrained(d / "hf")
        feeds = [_inputs(model.config.vocab_size, b, s, 10 + i, mask) for i, (b, s) in enumerate(SHAPES)]
        ref = model.float()
        refs = {}
        for i, f in enumerate(feeds):
            with torch.no_grad():
                r = ref(**{k: torch.from_numpy(v) for k, v in f.items()},
                        **({"use_cache": False} if name in DECODERS else {}))
            refs[f"ref{i}"] = (r.logits if name in DECODERS else r.last_hidden_state).numpy()
            for k, v in f.items():
                refs[f"in{i}_{k}"] = v
        np.savez(d / "data.npz", **refs)
        (d / "case.json").write_text(json.dumps({"name": name, "dtype": dtype, "mask": mask, "shapes": SHAPES}))
        print(f"prepared {case}: {sorted(p.name for p in art.iterdir())}")


# ---- GPU side --------------------------------------------------------------------------------
ROOT = pathlib.Path(os.environ.get("LLMC_GPU_MODELS", "gpu_art/models"))
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _case_dirs():
    return sorted(p for p in ROOT.glob("*") if (p / "case.json").exists()) if ROOT.exists() else []


def _load_case(d: pathlib.Path):
    meta = json.loads((d / "case.json").read_text())
    data = np.load(d / "data.npz")
    feeds = []
    for i in range(len(meta["shapes"])):
        feeds.append({k.split("_", 1)[1]: data[k] for k in data.files if k.startswith(f"in{i}_")})
    return meta, data, feeds


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture(scope="module", params=[p.name for p in _case_dirs()] or ["none"])
def case(request):
    if request.param == "none":
        pytest.skip(f"no prepared cases under {ROOT} (run this file with --prepare on the build host)")
    from llmc.runtime.executor import load

    d = ROOT / request.param
    meta, data, feeds = _load_case(d)
    materialize_links(d / "artifact.llmc")
    return d, meta, data, feeds, load(d / "artifact.llmc", device="cuda")


def materialize_links(art: pathlib.Path) -> None:
    """The prepared tree shares one shim.so through symlinks (to stay small in transit); the
    runtime loads regular files only, so each link is replaced by a copy here."""
    import shutil

    for f in art.iterdir():
        if f.is_symlink():
            target = f.resolve()
            f.unlink()
            shutil.copy2(target, f)


def test_matches_torch_on_gpu(case):
    d, meta, data, feeds, ex = case
    name = meta["name"]
    dt = getattr(torch, meta["dtype"])
    model = None
    if (d / "hf").exists():
        import transformers

        cls = transformers.AutoModelForCausalLM if name in DECODERS else transformers.AutoModel
        model = cls.from_pretrained(str(d / "hf"), dtype=dt, attn_implementation="sdpa").cuda().eval()
    for i, feed in enumerate(feeds):
        got = ex(**feed)[0].astype(np.float32)
        got2 = ex(**feed)[0].astype(np.float32)  # the second call replays the CUDA graph
        np.testing.assert_array_equal(got, got2)
        ref_cpu = data[f"ref{i}"]
        assert got.shape == ref_cpu.shape
        if model is not None:
            with torch.no_grad():
                r = model(**{k: torch.from_numpy(v).cuda() for k, v in feed.items()},
                          **({"use_cache": False} if name in DECODERS else {}))
            ref = (r.logits if name in DECODERS else r.last_hidden_state).float().cpu().numpy()
            err = rel_err(got, ref)
            print(f"{d.name} {feed['input_ids'].shape}: rel err vs torch GPU {meta['dtype']} {err:.2e}, "
                  f"vs torch CPU fp32 {rel_err(got, ref_cpu):.2e}")
            assert err <= 1e-2, f"{d.name} shape {i}: rel err {err:.2e} vs torch on the GPU"
        else:
            err = rel_err(got, ref_cpu)
            print(f"{d.name} {feed['input_ids'].shape}: rel err vs torch CPU fp32 {err:.2e}")
            assert err <= 2e-2
    assert ex.graph_state(**feeds[0]).startswith("captured")


def test_minilm_embedding_cosine(case):
    d, meta, data, feeds, ex = case
    if meta["name"] != "minilm":
        pytest.skip("MiniLM only")
    for i, feed in enumerate(feeds):
        m = feed["attention_mask"][..., None].astype(np.float64)

        def embed(h):
            e = (h.astype(np.float64) * m).sum(1) / m.sum(1)
            return e / np.linalg.norm(e, axis=-1, keepdims=True)

        cos = (embed(ex(**feed)[0]) * embed(data[f"ref{i}"])).sum(-1)
        print(f"minilm {feed['input_ids'].shape}: cosine min {cos.min():.6f}")
        assert cos.min() >= 0.999, cos


def test_eager_launches_match_graph_replay(case):
    d, meta, data, feeds, _ = case
    from llmc.runtime.executor import load

    eager = load(d / "artifact.llmc", device="cuda", graphs=False)
    graph = load(d / "artifact.llmc", device="cuda")
    for feed in feeds[:2]:
        a = eager(**feed)[0]
        graph(**feed)
        b = graph(**feed)[0]
        np.testing.assert_array_equal(a, b)
    assert eager.graph_state(**feeds[0]) == "off"


def test_runtime_alone_loads_no_torch_and_no_compiler(case):
    d, *_ = case
    code = ("import sys, numpy as np, llmc; ex = llmc.load(sys.argv[1], device='cuda');"
            "feed = {n: np.ones((1, 8), np.int64) for n in ex.input_names};"
            "out = ex(**feed); assert np.isfinite(out[0].astype(np.float32)).all();"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('llmc.compiler') or m == 'tvm.relax'];"
            "assert not bad, bad; import tvm; assert tvm.base._RUNTIME_ONLY; print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(d / "artifact.llmc")], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", required=True, help="output folder")
    ap.add_argument("--arch", default="sm_90")
    a = ap.parse_args()
    prepare(pathlib.Path(a.prepare), a.arch)
