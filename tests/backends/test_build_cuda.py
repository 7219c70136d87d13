"""CUDA builds on a host without a GPU: the artifact must hold compiled code (a fatbin) for
every TVM kernel, the routes to the shim must be right, and the CUDA grouping must compute
the same thing as the model (checked by building that same Program for the CPU).

Needs nvcc and gcc (skipped otherwise). The shim (cuBLASLt + flash attention) build takes
~2 minutes once per arch and is cached (~/.cache/llmc or $LLMC_CACHE_DIR): the tests that
need it are marked slow; the fatbin tests build with use_shim=False (TVM kernels only).
"""
import json
import shutil
import struct

import numpy as np
import pytest
import torch

from llmc.api import CompileOptions, capture, compile_graph
from llmc.compiler.frontend.hf_models import DECODERS, tiny_model

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("gcc") is None,
                                reason="CUDA builds need nvcc and gcc")
BOUNDS = {"batch": (1, 4), "seq": (1, 64)}


def fatbin_entries(blob: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of every entry of every fatbin in `blob` (kind: SASS or PTX)."""
    out, start = [], 0
    while (i := blob.find(bytes.fromhex("50ed55ba01001000"), start)) >= 0:
        size = struct.unpack_from("<Q", blob, i + 8)[0]
        off, end = i + 16, i + 16 + size
        while off < end:
            kind, _, hsize, psize = struct.unpack_from("<HHIQ", blob, off)
            out.append(("PTX" if kind == 1 else "SASS", struct.unpack_from("<I", blob, off + 28)[0]))
            off += hsize + psize
        start = end
    return out


def _compile(name, target, dtype=torch.bfloat16, use_shim=False, mask=True):
    model, kw = tiny_model(name)
    model = model.to(dtype)
    if not mask:
        kw.pop("attention_mask")
    opts = CompileOptions(target=target, dim_bounds=BOUNDS, use_shim=use_shim)
    return compile_graph(capture(model, (), kw, opts), opts)


@pytest.mark.parametrize("arch", ["sm_90", pytest.param("sm_80", marks=pytest.mark.slow)])
def test_cuda_artifact_embeds_a_fatbin_for_every_kernel(tmp_path, arch):
    cm = _compile("llama", f"cuda:{arch}")
    out = cm.export(tmp_path / "a.llmc")
    blob = (out / "kernels.so").read_bytes()
    assert b"__global__" not in blob  # no CUDA source: loading needs no compiler
    n = int(arch[3:])
    assert ("SASS", n) in fatbin_entries(blob)
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["device"] == "cuda" and m["target"]["name"] == f"cuda:{arch}" and m["cuda"]["fatbin"]
    assert all(k["route"] == "tvm" for k in m["program"]["kernels"].values())
    for name in m["program"]["kernels"]:  # every kernel is exported by the library
        assert f"__tvm_ffi_{name}".encode() in blob, name
    assert not (out / "shim.so").exists()


def test_gpu_schedule_rejects_nothing_and_checks_device_code():
    import tvm
    from tvm import te

    from llmc.backends.gpu_schedule import assert_device_code, has_thread_binding, schedule_gpu_func
    from llmc.errors import LLMCError

    a = te.placeholder((64,), "float32", name="a")
    b = te.compute((64,), lambda i: a[i] * 2, name="b")
    f = te.create_prim_func([a, b]).with_attr("global_symbol", "dbl")
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with target:
        g = schedule_gpu_func(f, target)
    assert has_thread_binding(g) and not has_thread_binding(f)
    host_only = tvm.compile(tvm.IRModule({"dbl": f}), target={"kind": "llvm"})
    with pytest.raises(LLMCError, match="no device code"):
        assert_device_code(host_only)


def test_injective_rows_schedule_gives_a_block_per_row():
    """Symbolic leading dims go to blockIdx (one division per block), the static trailing
    ones to threads; a kernel without static trailing work falls back to one fused index."""
    import tvm
    from tvm import te

    from llmc.backends.gpu_schedule import Injective, schedule_gpu_func

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    b, s = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")

    def scheduled(shape):
        x = te.placeholder(shape, "float16", name="x")
        y = te.compute(shape, lambda *i: x(*i) * tvm.tirx.const(2, "float16"), name="y")
        f = te.create_prim_func([x, y, b, s]).with_attr("global_symbol", "f")
        with target:
            return schedule_gpu_func(f, target, rules=[Injective()]).script()

    rows = scheduled((b, s, 1536))
    assert 'T.thread_binding(b * s, thread="blockIdx.x")' in rows
    assert '256), thread="threadIdx.x")' in rows or '(256, thread="threadIdx.x")' in rows
    small = scheduled((b, s, 64))  # 64 elements per row: fewer than a block's threads
    assert 'T.thread_binding(b * s, thread="blockIdx.x")' not in small and "blockIdx.x" in small


def test_arena_views_with_byte_offset_are_accepted():
    """GPU kernels take arena views whose DLTensor has a byte_offset (checked on llvm)."""
    import tvm
    from tvm import te

    from llmc.backends.build_cuda import _offset_params

    a = te.placeholder((8,), "float32", name="a")
    b = te.compute((8,), lambda i: a[i] + 1, name="b")
    f = _offset_params(te.create_prim_func([a, b]).with_attr("global_symbol", "add1"))
    fn = tvm.compile(tvm.IRModule({"add1": f}), target={"kind": "llvm"}).mod["add1"]
    arena = tvm.runtime.tensor(np.arange(32, dtype="float32"))
    fn(arena._create_view((8,), "float32", 64), arena._create_view((8,), "float32", 0))
    np.testing.assert_array_equal(arena.numpy()[:8], np.arange(16, 24) + 1)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "qwen2"])
def test_cuda_grouping_matches_torch_when_built_for_cpu(name):
    """The CUDA program (token-major attention, split GEMM cores) run by the CPU backend."""
    from llmc.backends.artifact import build_manifest, weights_of
    from llmc.backends.build import build_kernels, default_target
    from llmc.backends.build_cuda import build_program
    from llmc.backends.cuda.routes import match_route
    from llmc.backends.lower import describe_kernel
    from llmc.backends.targets import parse_target
    from llmc.runtime.executor import Executor
    from llmc.runtime.manifest import Manifest

    model, kw = tiny_model(name)
    model = model.to(torch.bfloat16)
    graph = capture(model, (), kw, CompileOptions(dim_bounds=BOUNDS))
    prog, _ = build_program(graph)
    routes = {n: match_route(k) for n, k in prog.kernels.items()}
    attn = [r for r in routes.values() if r and r.func == "llmc_attention_ext"]
    assert len(attn) == 1
    if name in ("bert", "gpt2"):  # q/k/v sliced from one QKV projection: read in place
        assert attn[0].scalars[2] & 16
    else:  # rotary: the kernel before attention writes q/k/v token-major
        assert attn[0].scalars[2] == 15
    assert sum(1 for r in routes.values() if r and r.func in ("llmc_gemm_ex", "llmc_gemm_fused")) >= 3
    fused = sorted(r.label for r in routes.values() if r and r.func == "llmc_gemm_fused")
    if name in ("llama", "qwen2"):  # RMSNorm -> QKV, RMSNorm -> gate/up -> SwiGLU: one call each
        # (cuda/fused_gemm.py; Qwen2's QKV bias is added by the rotary kernel, which reads it anyway)
        assert fused == ["fused gemv/gemm rmsnorm+W^T", "fused gemv/gemm rmsnorm+W^T +swiglu"], fused
    else:  # LayerNorm and GELU models keep their GEMMs as they were
        assert fused == [], fused
    ex = build_kernels(prog.kernels, default_target())
    run = Executor(Manifest.from_json(build_manifest(prog, parse_target("llvm"), 0, describe_kernel)), ex.mod,
                   weights_of(prog))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, -3:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, **({"use_cache": False} if name in DECODERS else {}))
    ref = (ref.logits if name in DECODERS else ref.last_hidden_state).float().numpy()
    got = run(input_ids=ids.numpy(), attention_mask=mask.numpy())[0].astype(np.float32)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2


@pytest.mark.slow
def test_cuda_artifact_with_shim_routes(tmp_path):
    cm = _compile("llama", "cuda", use_shim=True, mask=False)
    out = cm.export(tmp_path / "s.llmc")
    m = json.loads((out / "manifest.json").read_text())
    assert m["libraries"]["roles"] == {"tvm": "kernels.so", "shim": "shim.so"} and (out / "shim.so").exists()
    routes = {n: k for n, k in m["program"]["kernels"].items() if k["route"] == "shim"}
    attn = [k for k in routes.values() if k["func"] == "llmc_attention_ext"]
    gemm = [k for k in routes.values() if k["func"] == "llmc_gemm_ex"]
    assert len(attn) == 1 and attn[0]["scalars"] == [0.25, 1, 15]  # scale, causal, all token-major
    assert attn[0]["tensors"][3] is None  # no mask
    # the O and down projections with their residuals (the QKV and gate/up GEMMs are fused calls, below)
    assert len(gemm) >= 2 and all(len(k["tensors"]) == 5 and len(k["scalars"]) == 2 for k in gemm)
    assert all(k["tensors"][3] is not None and k["scalars"] == [1, 0] for k in gemm)  # W^T, a residual epilogue
    calls_to = {c["kernel"] for c in m["program"]["calls"]}
    assert set(routes) <= calls_to
    blob = (out / "kernels.so").read_bytes()
    for name, k in m["program"]["kernels"].items():
        if k["route"] == "tvm":
            assert f"__tvm_ffi_{name}".encode() in blob
    shim = (out / "shim.so").read_bytes()
    assert b"__tvm_ffi_llmc_gemm_ex" in shim and b"__tvm_ffi_llmc_attention_ext" in shim
    # RMSNorm -> gate/up -> SwiGLU is one call (backends/cuda/fused_gemm.py), as is RMSNorm -> QKV
    (swiglu,) = [k for k in m["program"]["kernels"].values() if "silu" in k["ops"]]
    assert swiglu["route"] == "shim" and swiglu["func"] == "llmc_gemm_fused" and swiglu["scalars"][0] == 1
    assert swiglu["ops"].startswith("rms_norm+permute+matmul") and swiglu["tensors"][1] is not None
    assert b"__tvm_ffi_llmc_gemm_fused" in shim


def test_perf_artifact_omits_large_weights(tmp_path):
    cm = _compile("llama", "cuda")
    out = cm.export(tmp_path / "p.llmc", weights=False, keep_below=4096)
    m = json.loads((out / "manifest.json").read_text())
    omitted = set(m["weights"]["omitted"])
    from safetensors.numpy import load_file

    kept = set(load_file(str(out / "weights.safetensors")))
    names = {b["name"] for b in m["program"]["buffers"] if b["role"] == "weight"}
    assert omitted and kept and omitted | kept == names and not omitted & kept
    from llmc.errors import ArtifactError
    from llmc.runtime.executor import load

    with pytest.raises(ArtifactError):
        load(out)  # wrong device and no weights: refused with a clear error


@pytest.mark.slow
@pytest.mark.parametrize("kv", [None, "int8", "fp8"])
def test_cuda_generation_artifact_routes_paged_attention_to_the_shim(tmp_path, kv):
    """A bf16 causal LM compiled for CUDA gets its step function: every paged attention is one
    llmc_paged_attention shim call over the 8 step buffers, the KV pages are bf16 program
    inputs (or uint8 rows of codes and a scale, the codec in the call's layout bits 16 / 32), and
    the artifact loads back through the manifest checks (no GPU needed for that)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "helpers"))
    from causal_lms import tiny_causal_lm

    import llmc
    from llmc.generation import GenerateOptions
    from llmc.runtime.artifact_files import read_manifest

    model = tiny_causal_lm("qwen2", hidden_size=128, head_dim=32).to(torch.bfloat16)
    ids = torch.randint(3, 90, (1, 8))
    cm = llmc.compile(model, (ids,), target="cuda:sm_90", dim_bounds={"batch": (1, 2), "seq": (1, 64)},
                      generate=GenerateOptions(max_tokens=32, max_seqs=4), kv_cache_dtype=kv)
    art = cm.export(tmp_path / "gen.llmc")
    m = read_manifest(art)  # sealed: hashes of kernels.so, step_kernels.so, shim.so, weights
    gen = m.generation
    store, codec = {None: ("bfloat16", 0), "int8": ("int8", 16), "fp8": ("float8_e4m3fn", 32)}[kv]
    assert gen.kv_dtype == store and [(l.kv_heads, l.head_dim) for l in gen.layers] == [(2, 32), (2, 32)]
    caches = [i for i in gen.program.inputs if i.name.startswith("kv_cache.")]
    assert all((c.dtype, c.shape[-1]) == (("bfloat16", 32) if kv is None else ("uint8", 36)) for c in caches)
    paged = [k for k in gen.program.kernels.values() if k.route == "shim" and k.func == "llmc_paged_attention_rope"]
    assert len(paged) == 2
    for k in paged:  # the QKV output thrice (packed), the 4 cache / page buffers, out, the rotary tables
        args = [t.arg for t in k.tensors]
        assert len(args) == 10 and args[:3] == [args[0]] * 3 and len(set(args[2:])) == 8 and k.scalars[1] == 0
        assert abs(k.scalars[0] - 32 ** -0.5) < 1e-6
        assert k.scalars[2] == 15 | 64 | codec  # token-major, packed q | k | v: slices and rotary in the call
    # per decoder layer: norm + qkv GEMV (+ bias), paged attention, o_proj, norm + gate_up + SwiGLU, down
    # (the slices, rotary and transposes around attention cost no launch)
    calls = [gen.program.kernels[c.kernel] for c in gen.program.calls]
    assert len(calls) <= 5 * 2 + 6, [k.name for k in calls]
    assert m.step_manifest().libraries == {"tvm": "step_kernels.so", "shim": "shim.so"}


@pytest.mark.slow
def test_cuda_tensor_parallel_ranks_get_the_fused_decode_gemvs(tmp_path):
    """tp=2 for CUDA: every rank runs the single-GPU build's fused GEMV calls (norm -> QKV, norm ->
    gate/up -> SwiGLU) over [N, K] weights, each rank its own shards transposed as the build did
    rank 0's. (The tokens the ranks give together are checked on GPUs: tests/models/test_gpu_tp.py.)"""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "helpers"))
    from causal_lms import tiny_causal_lm

    import llmc
    from llmc.generation import GenerateOptions
    from llmc.runtime.artifact_files import load_weights, read_manifest

    model = tiny_causal_lm("llama", hidden_size=128, head_dim=32, num_key_value_heads=2).to(torch.bfloat16)
    ids = torch.randint(3, 90, (1, 8))
    art = llmc.compile(model, (ids,), target="cuda:sm_90", dim_bounds={"batch": (1, 2), "seq": (1, 64)},
                       generate=GenerateOptions(max_tokens=32, max_seqs=4), tp=2).export(tmp_path / "tp2")
    for r in range(2):
        m = read_manifest(art / f"rank{r}")
        prog = m.generation.program
        kernels = [prog.kernels[c.kernel] for c in prog.calls]  # one per launch, in order
        fused = sorted(k.label for k in kernels if k.route == "shim" and k.func == "llmc_gemm_fused")
        assert fused.count("fused gemv/gemm rmsnorm+W^T") == 2 and fused.count("fused gemv/gemm rmsnorm+W^T +swiglu") == 2, fused
        # one all-reduce after the vocabulary-split embedding and one after each row-parallel GEMM,
        # whose epilogue adds the residual stream's partial sum (the shard pass defers the reduce)
        assert [k.func for k in kernels if k.route == "coll"] == ["all_reduce"] * 5 + ["all_gather"]
        w = load_weights(art / f"rank{r}", m)
        for name, mod in (("self_attn.o_proj", model.model.layers[1].self_attn.o_proj),
                          ("mlp.down_proj", model.model.layers[1].mlp.down_proj)):
            whole = mod.weight.detach().float().numpy()  # torch [N, K]; row-parallel: rank r's K block
            k = whole.shape[1] // 2
            np.testing.assert_array_equal(w[f"model.layers.1.{name}.weight"].astype(np.float32), whole[:, r * k:(r + 1) * k])


def test_cuda_generation_of_an_fp32_model_is_refused_clearly():
    """The paged kernel is half precision only: required generation names the cause; the
    default (generate=None) compiles the forward and leaves the step out."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "helpers"))
    from causal_lms import tiny_causal_lm

    import llmc

    model = tiny_causal_lm("llama", hidden_size=128, head_dim=32)
    ids = torch.randint(3, 90, (1, 8))
    kw = dict(target="cuda:sm_90", dim_bounds={"batch": (1, 2), "seq": (1, 64)})
    with pytest.raises(llmc.LLMCError, match="half precision"):
        llmc.compile(model, (ids,), generate=True, **kw)


@pytest.mark.slow
def test_cuda_quantized_generation_routes_qmatmul_to_the_shim(tmp_path):
    """A bf16 causal LM quantized to int4 and compiled for CUDA: every QMATMUL of the forward
    and of the step function is one llmc_qgemv call over x viewed as [rows, K] (a kernel of its
    own) or one llmc_qgemv_fused call with its neighbours, with the scheme's bits and group as
    scalars; an fp32 model's is refused by name."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "helpers"))
    from causal_lms import tiny_causal_lm

    import llmc
    from llmc.generation import GenerateOptions
    from llmc.runtime.artifact_files import read_manifest

    model = tiny_causal_lm("llama", hidden_size=128, head_dim=32).to(torch.bfloat16)
    ids = torch.randint(3, 90, (1, 8))
    kw = dict(target="cuda:sm_90", dim_bounds={"batch": (1, 2), "seq": (1, 64)}, quant="int4", group=32, symmetric=True)
    cm = llmc.compile(model, (ids,), generate=GenerateOptions(max_tokens=32, max_seqs=4), **kw)
    m = read_manifest(cm.export(tmp_path / "q.llmc"))
    for program in (m.program, m.generation.program):
        q = [k for k in program.kernels.values() if k.route == "shim" and k.func in ("llmc_qgemv", "llmc_qgemv_fused")]
        assert any(k.func == "llmc_qgemv_fused" for k in q), [k.name for k in program.kernels.values()]
        for k in q:
            if k.func == "llmc_qgemv":
                assert tuple(k.scalars) == (4, 32) and len(k.tensors) == 5 and k.tensors[3] is None  # symmetric: no zeros
                assert len(k.tensors[0].shape) == 2 and len(k.tensors[4].shape) == 2
            else:  # a norm before it, a SwiGLU or a residual after it in the same call (cuda/fused_gemm.py)
                assert tuple(k.scalars[:2]) == (4, 32) and len(k.tensors) == 7 and k.tensors[4] is None
                assert k.tensors[1] is not None or k.tensors[5] is not None or k.scalars[2] == 1
    # a perf artifact (--weights none) leaves the packed weights out too: the runtime fills them
    perf = read_manifest(cm.export(tmp_path / "perf.llmc", weights=False, keep_below=0))
    packed = {t.name for t in perf.program.buffers if t.role == "weight" and t.dtype == "uint8"}
    assert packed and packed <= set(perf.weights.omitted)
    with pytest.raises(llmc.LLMCError, match="half precision"):
        llmc.compile(tiny_causal_lm("llama", hidden_size=128, head_dim=32), (ids,), generate=False, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp8", "w8a8"])
def test_cuda_activation_quant_routes_qmatmul_to_cublaslt(tmp_path, quant):
    """FP8 / W8A8 for CUDA: every QMATMUL of the forward and of the step function is one
    llmc_qgemm_a8 call [x rows, qweight, scales, None, residual or None, y] with the float8 flag, the floor and the
    code range as scalars: the ops computing the rows' scales (abs, max, maximum, div) are part of
    that call, not a reduction kernel of their own."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "helpers"))
    from causal_lms import tiny_causal_lm

    import llmc
    from llmc.generation import GenerateOptions
    from llmc.runtime.artifact_files import read_manifest

    model = tiny_causal_lm("llama", hidden_size=128, head_dim=32).to(torch.bfloat16)
    ids = torch.randint(3, 90, (1, 8))
    cm = llmc.compile(model, (ids,), target="cuda:sm_90", dim_bounds={"batch": (1, 2), "seq": (1, 64)}, quant=quant,
                      generate=GenerateOptions(max_tokens=32, max_seqs=4))
    m = read_manifest(cm.export(tmp_path / "q.llmc"))
    for program in (m.program, m.generation.program):
        q = [k for k in program.kernels.values() if k.route == "shim" and k.func == "llmc_qgemm_a8"]
        assert q and not [k for k in program.kernels.values() if k.func == "llmc_qgemv"]
        for k in q:
            assert tuple(k.scalars) == (int(quant == "fp8"), 1e-6, 448.0 if quant == "fp8" else 127.0)
            assert len(k.tensors) == 6 and k.tensors[3] is None
            assert [len(t.shape) for t in (*k.tensors[:3], k.tensors[5])] == [2, 2, 2, 2]
        # o_proj and down take the residual add into the call, as the bf16 GEMM's epilogue does
        assert sum(k.tensors[4] is not None for k in q) == 2 and all(k.ops.endswith("+add") for k in q
                                                                       if k.tensors[4] is not None)
        assert not [k for k in program.kernels.values() if k.route == "tvm" and "maximum+div" in k.ops]


@pytest.mark.slow
def test_cuda_sparse24_routes_pruned_matmuls_to_cusparselt(tmp_path):
    """--sparsity 2:4 for CUDA: each pruned matmul whose N and K are multiples of 32 is one
    llmc_gemm_sparse24 call (the pruned weight as W [N, K]), the LM head (not pruned) stays a
    cuBLASLt GEMM, and the pruned weights marked sparse24 in the graph are the routes' weights."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "helpers"))
    from causal_lms import tiny_causal_lm

    import llmc
    from llmc.compiler.ops import Op
    from llmc.runtime.artifact_files import read_manifest

    model = tiny_causal_lm("llama", hidden_size=128, head_dim=32, intermediate_size=256).to(torch.bfloat16)
    ids = torch.randint(3, 90, (1, 8))
    cm = llmc.compile(model, (ids,), target="cuda:sm_90", dim_bounds={"batch": (1, 2), "seq": (1, 64)},
                      sparsity="2:4", generate=False)
    marked = {n.attrs.name for n in cm.program.graph.nodes() if n.op is Op.WEIGHT and n.attrs.sparse24}
    assert marked and all(name.endswith(".sparse24") for name in marked)
    m = read_manifest(cm.export(tmp_path / "s.llmc"))
    names = {b.id: b.name for b in m.program.buffers}
    sparse = [k for k in m.program.kernels.values() if k.route == "shim" and k.func == "llmc_gemm_sparse24"]
    dense = [k for k in m.program.kernels.values() if k.route == "shim" and k.func in ("llmc_gemm_ex", "llmc_gemm_fused")]
    calls = {c.kernel: c.args for c in m.program.calls}
    sparse_calls = [c for c in m.program.calls if c.kernel in {k.name for k in sparse}]
    assert len(sparse) == 4 and len(sparse_calls) == 4 * 2 and dense  # qkv, o, gate_up, down (kernels shared
    # by both layers; a pruned weight is never fused with its norm); the LM head dense (with the final norm)
    for k in sparse:
        assert names[calls[k.name][k.tensors[1].arg]] in marked and tuple(k.scalars) in ((0,), (1,))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp8", "w8a8"])
def test_cuda_grouping_of_activation_quant_matches_the_cpu_program(quant):
    """The CUDA program of an FP8 / W8A8 model (the row-scale ops and the residual add moved into
    the QMATMUL's kernel, which CUDA routes to llmc_qgemm_a8), built for the CPU by TVM, computes
    what the CPU compilation of the same quantized model computes: the moved groups are sound."""
    from llmc.backends.artifact import build_manifest, weights_of
    from llmc.backends.build import build_kernels, default_target
    from llmc.backends.build_cuda import build_program
    from llmc.backends.cuda.routes import match_route
    from llmc.backends.lower import describe_kernel
    from llmc.backends.targets import parse_target
    from llmc.runtime.executor import Executor
    from llmc.runtime.manifest import Manifest
    from llmc.passes.quant.scheme import QuantScheme

    model, kw = tiny_model("llama")
    model = model.to(torch.bfloat16)
    opts = CompileOptions(dim_bounds=BOUNDS, quant=QuantScheme(quant))
    graph = capture(model, (), kw, opts)
    prog, _ = build_program(graph, opts.pipeline())
    routes = [r for r in (match_route(k) for k in prog.kernels.values()) if r and r.func == "llmc_qgemm_a8"]
    assert routes and all(r.tensors[3] is None for r in routes) and any(r.tensors[4] is not None for r in routes)
    ex = build_kernels(prog.kernels, default_target())
    run = Executor(Manifest.from_json(build_manifest(prog, parse_target("llvm"), 0, describe_kernel)), ex.mod,
                   weights_of(prog))
    cpu = compile_graph(capture(model, (), kw, opts), opts)
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(1)).numpy()
    mask = np.ones((2, 11), np.int64)
    got = run(input_ids=ids, attention_mask=mask)[0].astype(np.float32)
    want = cpu(input_ids=ids, attention_mask=mask)[0].astype(np.float32)
    with torch.no_grad():
        fp = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   use_cache=False).logits.float().numpy()
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    # both programs round bf16 intermediates at different kernel boundaries, and a code near a
    # rounding midpoint lands one step apart (a random tiny model in bf16 has many such rows): the
    # two agree to a few percent, and each is as far from the unquantized model as the other
    print(f"{quant}: cuda grouping vs cpu program {rel(got, want):.4f}; vs the bf16 model: cuda grouping "
          f"{rel(got, fp):.4f}, cpu program {rel(want, fp):.4f}")
    assert rel(got, want) < 5e-2 and rel(got, fp) < 1.3 * rel(want, fp)
