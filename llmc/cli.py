"""The `llmc` command: compile, run, inspect (and bench on a GPU machine)."""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
import time

from .errors import LLMCError

USAGE = """examples:
  llmc compile minilm -o minilm.llmc --report      # a bundled example (the real all-MiniLM-L6-v2)
  llmc compile tiny-llama -o tl.llmc               # a random 2-layer Llama for trying things out
  llmc compile ./my-hf-model -o out.llmc --seq-len 512 --batch 4
  llmc compile model.onnx -o out.llmc --dim b=1:4 --dim s=1:256
  llmc compile ./my-hf-model -o out.llmc --cpu native   # for this machine's CPU only
  llmc compile mypkg.models:make -o out.llmc       # make() returns (model, example_args)
  llmc run out.llmc --input input_ids=ids.npy -o result.npz
  llmc run out.llmc --input inputs.npz             # arrays by input name
  llmc inspect out.llmc
  llmc compile llmc.bench_models:llama_1b -o l1b.llmc --target cuda --weights none --batch 8
  llmc bench l1b.llmc --model llmc.bench_models:llama_1b --batch 8 --seq 512   # on a GPU machine
  llmc serve tl.llmc --port 8000 --policy mlfq     # an OpenAI-compatible server (pip install llmc[serve])
  llmc bench-serve --base-url http://127.0.0.1:8000 --request-rate 4 --num-prompts 200
  llmc distill ./my-hf-model -o student --data train.txt --layers 2 --time-limit 600   # then llmc compile student
"""


def _progress(msg: str) -> None:
    print(f"[llmc] {msg}", file=sys.stderr, flush=True)


def parse_dim(spec: str) -> tuple[str, tuple[int, int]]:
    """'NAME=LO:HI' -> (NAME, (LO, HI))."""
    name, eq, rng = spec.partition("=")
    lo, colon, hi = rng.partition(":")
    try:
        bounds = (int(lo), int(hi))
    except ValueError:
        bounds = (0, -1)
    if not eq or not colon or not name.isidentifier() or not 1 <= bounds[0] <= bounds[1]:
        raise LLMCError(f"--dim {spec!r}: write NAME=LO:HI with 1 <= LO <= HI (e.g. --dim seq=1:2048)")
    return name, bounds


def dim_bounds(a: argparse.Namespace, onnx: bool) -> dict[str, tuple[int, int]]:
    """batch/seq from --batch/--seq-len, then each --dim. Torch sources only have batch and
    seq; ONNX files may name their dims anything (unnamed ones get batch/seq by position)."""
    bounds = {"batch": (1, a.batch), "seq": (1, a.seq_len)}
    for spec in a.dim:
        name, b = parse_dim(spec)
        if not onnx and name not in bounds:
            raise LLMCError(f"--dim {spec!r}: a PyTorch model has only the dims batch and seq "
                            f"(--dim NAME=... with other names is for ONNX files)")
        bounds[name] = b
    return bounds


def target_of(a: argparse.Namespace) -> str:
    """--target, with --cpu NAME as sugar for llvm:NAME."""
    if a.cpu is None:
        return a.target
    if a.target.split(":")[0] not in ("llvm", "cpu"):
        raise LLMCError(f"--cpu {a.cpu} only applies to CPU targets, not --target {a.target}")
    return f"llvm:{a.cpu}"


def _check_output_folder(out: pathlib.Path, force: bool) -> None:
    """An existing artifact is replaced only with --force: a typo must not wipe a build."""
    if not out.exists():
        return
    if not out.is_dir() or not ((out / "manifest.json").exists() or not any(out.iterdir())):
        raise LLMCError(f"{out} exists and is not an llmc artifact; refusing to overwrite it")
    if (out / "manifest.json").exists() and not force:
        raise LLMCError(f"{out} already holds an artifact; pass --force to replace it")


def cmd_compile(a: argparse.Namespace) -> int:
    from .api import CompileOptions, capture, compile_graph
    from .backends.targets import parse_target
    from .sources import resolve

    target = target_of(a)
    parse_target(target)
    from .api import check_activation_quant, check_kv_cache_dtype, compression_setup, compression_windows

    scheme, sparsity, calib_file = compression_setup(a.quant, a.sparsity, a.group, a.method, a.calib,
                                                     a.calib_samples, a.sym, lm_head=a.quant_lm_head)  # before work
    check_activation_quant(scheme, parse_target(target))
    check_kv_cache_dtype(a.kv_cache_dtype, parse_target(target).device, not a.no_generate)
    out_path = pathlib.Path(a.output)
    _check_output_folder(out_path, a.force)
    bounds = dim_bounds(a, onnx=a.src.endswith(".onnx"))  # before the slow load: resolve() keys on the suffix too
    t0 = time.perf_counter()
    _progress(f"loading {a.src}")
    src = resolve(a.src, batch=min(2, bounds["batch"][1]), seq=min(16, bounds["seq"][1]), progress=_progress)
    _progress(f"capturing {src.description}")
    opts = CompileOptions(target, None, bounds, not a.no_fuse, a.verify_each, a.dump_ir, _progress,
                          use_shim=not a.no_shim, use_blas=not a.no_blas, quant=scheme, sparsity=sparsity)
    for s in (scheme, sparsity):
        if s is not None and s.needs_calibration and src.tokenizer is None:
            raise LLMCError(f"--method {s.method} tokenizes --calib with the model's tokenizer, and {a.src} has no "
                            f"tokenizer.json")
    graph = capture(src.model, src.args, src.kwargs, opts)
    opts.calib_windows = compression_windows(scheme, sparsity, calib_file, graph, src.tokenizer)
    _progress(f"captured {len(graph.nodes())} nodes, {len(graph.params)} weights in {time.perf_counter() - t0:.1f}s")
    from .generation import GenerateOptions, attach, eligible, eos_ids, ids_only_capture

    # a causal LM gets its step function when its graph allows it (required with --generate)
    gen = None if a.no_generate else GenerateOptions(a.page_size, a.max_step_tokens, a.max_seqs,
                                                     kv_cache_dtype=a.kv_cache_dtype)
    if a.pp != 1 or a.tp != 1:
        # these builds never recapture: the torch weights go now (the graph holds its own copies; at the
        # 8B shape that is 5.6 GB of the build host's memory while every rank's shards are made)
        stop_ids, src.model = eos_ids(src.model), None
    if a.pp != 1:  # one artifact per pipeline stage under --output (llmc/pipeline_parallel.py)
        from .pipeline_parallel import compile_pipeline

        compiled = compile_pipeline(graph, opts, gen, a.pp, src.tokenizer, stop_ids, tp=a.tp)
    elif a.tp != 1:  # one artifact per rank under --output (llmc/tensor_parallel.py)
        from .tensor_parallel import compile_tensor_parallel

        if not a.generate and not eligible(graph):
            gen = None
        compiled = compile_tensor_parallel(graph, opts, gen, a.tp, src.tokenizer, stop_ids)
    else:
        compiled = compile_graph(graph, opts)
        attach(compiled, opts, gen, required=a.generate or a.kv_cache_dtype is not None, tokenizer=src.tokenizer,
               stop_token_ids=eos_ids(src.model),
               recapture=ids_only_capture(src.model, src.args, src.kwargs, opts))
    replacing = (out_path / "manifest.json").exists()
    _progress(f"writing {out_path}" + (" (replacing the artifact there, --force)" if replacing else ""))
    out = compiled.export(a.output, weights=a.weights == "all")
    if a.weights == "none":
        from .runtime.artifact_files import read_manifest

        omitted = read_manifest(out if a.tp == a.pp == 1 else out / "rank0").weights.omitted
        _progress(f"perf artifact: {len(omitted)} large weights left out (shapes only); the CUDA runtime fills "
                  f"them with random values")
    _progress(f"wrote {out} in {time.perf_counter() - t0:.1f}s total")
    if a.report:
        print(compiled.report)
    return 0


def _read_manifest_json(artifact: pathlib.Path) -> dict | None:
    """manifest.json as plain JSON, or None when it is not a small regular file holding a
    JSON object (the loader then reports the problem properly). A FIFO or a huge file
    named manifest.json is never opened here."""
    file = artifact / "manifest.json"
    try:
        if not file.is_file() or file.stat().st_size > 64 << 20:
            return None
        m = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def artifact_device(artifact: str) -> str:
    """The device an artifact was built for (its manifest's target section), "cpu" if unknown;
    the loader validates the manifest properly afterwards."""
    m = _read_manifest_json(pathlib.Path(artifact))
    target = m.get("target") if m else None
    device = target.get("device") if isinstance(target, dict) else None
    return device if isinstance(device, str) and device else "cpu"


def _parse_inputs(specs: list[str], names: list[str]) -> dict:
    """--input [name=]x.npy (positional order if unnamed) or x.npz (arrays by name)."""
    import numpy as np

    values: dict = {}
    position = 0
    for spec in specs:
        name, eq, file = spec.partition("=")
        if not eq:
            name, file = "", spec
        try:
            loaded = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise LLMCError(f"cannot read input {file!r}: {e}") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            if name:
                raise LLMCError(f"--input {spec!r}: an .npz holds its own names; pass it without name=")
            with loaded:
                for key in loaded.files:
                    if key in values:
                        raise LLMCError(f"input {key!r} given twice (in {file})")
                    values[key] = loaded[key]
            continue
        if not name:
            if position >= len(names):
                raise LLMCError(f"more --input files than model inputs {names}")
            name = names[position]
            position += 1
        if name in values:
            raise LLMCError(f"input {name!r} given twice")
        values[name] = loaded
    return values


def _output_file(path: str) -> pathlib.Path:
    """Where np.savez will write, checked before the model runs."""
    out = pathlib.Path(path)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")  # np.savez adds the suffix
    folder = out.parent
    if not folder.is_dir():
        raise LLMCError(f"-o {path}: folder {folder} does not exist")
    if out.is_dir() or not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise LLMCError(f"-o {path}: cannot write {out}")
    return out


def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np

    from .runtime.executor import load

    out_file = _output_file(a.output) if a.output else None
    device = a.device or artifact_device(a.artifact)
    _progress(f"loading {a.artifact} on {device}")
    ex = load(a.artifact, device=device)
    inputs = _parse_inputs(a.input, ex.input_names)
    t = time.perf_counter()
    outs = ex(**inputs)
    _progress(f"ran in {(time.perf_counter() - t) * 1000:.1f} ms")
    result = dict(zip(ex.output_names, outs))
    if out_file is not None:
        np.savez(out_file, **result)
        _progress(f"wrote {out_file}")
    for name, v in result.items():
        print(f"{name}: {v.dtype}{list(v.shape)}  mean={float(v.astype('float64').mean()):.6g} "
              f"first={np.ravel(v)[:4].tolist()}")
    return 0


def _inspect_parallel(a: argparse.Namespace, path: pathlib.Path) -> int:
    """The folder `llmc compile --tp N / --pp M` writes: its ranks (each checked), then rank 0 in full."""
    from .runtime.artifact_files import read_manifest

    m0 = read_manifest(path / "rank0")
    if m0.parallel is None:
        raise LLMCError(f"{path}/rank0 is a whole model, not a rank of a parallel artifact")
    n = m0.parallel.tp * m0.parallel.pp
    ranks = [read_manifest(path / f"rank{r}") for r in range(n)]  # validated, every one
    other = [r for r, m in enumerate(ranks) if m.parallel is None or m.parallel.fingerprint != m0.parallel.fingerprint]
    if other:
        raise LLMCError(f"{path}/rank{other[0]} belongs to another compile than rank0 (their fingerprints differ)")
    if not a.json:
        print(f"parallel artifact {path}: tp {m0.parallel.tp} x pp {m0.parallel.pp} = {n} ranks "
              f"(rank = stage * {m0.parallel.tp} + shard), fingerprint {m0.parallel.fingerprint}")
        for r, m in enumerate(ranks):
            layers = f", {len(m.generation.layers)} attention layers" if m.generation is not None else ""
            print(f"  rank{r}: stage {m.parallel.stage}, shard {m.parallel.rank}{layers}, "
                  f"{m.weights.count} weights")
        print("rank0 in full (inspect PATH/rankN for another):")
    a = argparse.Namespace(**{**vars(a), "artifact": str(path / "rank0")})
    return cmd_inspect(a)


def cmd_inspect(a: argparse.Namespace) -> int:
    from .runtime.artifact_files import read_manifest, read_manifest_json

    path = pathlib.Path(a.artifact)
    if not (path / "manifest.json").exists() and (path / "rank0" / "manifest.json").exists():
        return _inspect_parallel(a, path)
    m = read_manifest(path)  # validated (raises ArtifactError) before anything is printed
    if a.json:
        print(json.dumps(read_manifest_json(path), indent=1))
        return 0

    def shape(s):
        return "[" + ", ".join(str(d) if isinstance(d, int) else
                               " + ".join("*".join([str(c)] * (c != 1) + list(n)) for c, n in d) for d in s) + "]"

    p = m.program
    print(f"llmc artifact {a.artifact}  (llmc {m.llmc_version}, target {m.target}, device {m.device})")
    if m.parallel is not None:
        par = m.parallel
        print(f"parallel: rank {par.stage * par.tp + par.rank} of tp {par.tp} x pp {par.pp} (stage {par.stage}, "
              f"shard {par.rank}), fingerprint {par.fingerprint}")
    print("symbols: " + ", ".join(f"{s.name} in [{s.lo}, {s.hi}]" for s in p.symbols))
    for i in p.inputs:
        print(f"input  {i.name}: {i.dtype}{shape(i.shape)}")
    for o in p.outputs:
        b = p.buffers[o.buffer]
        print(f"output {o.name}: {b.dtype}{shape(b.shape)}")
    for c in m.input_checks:
        print(f"check  {c.input} in [{c.lo}, {c.hi}) (rows of {c.table})")
    counts: dict[str, int] = {}
    for c in p.calls:
        counts[c.kernel] = counts.get(c.kernel, 0) + 1
    print(f"kernels: {len(p.kernels)} built, {len(p.calls)} calls")
    routed = any(k.route != "tvm" or k.schedule for k in p.kernels.values())
    for name, k in p.kernels.items():
        route = ""
        if routed:
            route = f"{k.route}:{k.func} ({k.label})" if k.route != "tvm" else f"tvm ({k.schedule.removeprefix('tvm ')})"
            route = f"{route:44s} "
        print(f"  {name:20s} x{counts.get(name, 0):<4d} {route}{k.ops}")
    print("libraries: " + ", ".join(f"{k}={v}" for k, v in m.libraries.items()))
    w = m.weights
    print(f"weights: {w.count} tensors, {w.bytes / 2**20:.2f} MiB"
          + (f" ({len(w.omitted)} large ones left out: a perf artifact, random values at run time)"
             if w.omitted else ""))
    print(f"arena: {p.arena_bytes / 2**20:.2f} MiB planned")
    q = (read_manifest_json(path) or {}).get("quantization")
    if isinstance(q, dict):  # written by --quant (informational: the program carries the packed weights)
        n = max(int(q.get("quantized_params", 0)), 1)
        print(f"quantization: {q.get('scheme')} ({q.get('description')}): {q.get('quantized_matmuls')} matmuls, "
              f"{q.get('bytes_after', 0) / n:.3f} bytes per parameter (was {q.get('bytes_before', 0) / n:.1f}), "
              f"{q.get('bytes_before', 0) / 1e6:.2f} MB -> {q.get('bytes_after', 0) / 1e6:.2f} MB")
        emb = int(q.get("quantized_embeddings") or 0)
        emb_line = f"{emb} embedding lookup(s) read the LM head's packed table (QTAKE)" if emb else \
            "embeddings stay float"
        for line in q.get("kept") or ["kept: none (every weight matmul is quantized)"]:
            print(f"  {line}; {emb_line}")
    g = m.generation
    if g is not None:
        print(f"entry points: forward (the program above), step (generation: {len(g.program.kernels)} kernels, "
              f"{len(g.program.calls)} calls in {g.library})")
        print("step inputs: " + ", ".join(f"{i.name}{shape(i.shape)}" for i in g.program.inputs))
        layers = {(lay.kv_heads, lay.head_dim, lay.window) for lay in g.layers}
        kinds = "; ".join(f"{h} kv heads x {d}" + (f", window {w}" if w else "") for h, d, w in sorted(layers))
        from .runtime.engine.kv_codec import SCALE_BYTES, is_quantized

        row = f"head dim + {SCALE_BYTES} (uint8 codes, then the row's float32 scale)" if is_quantized(g.kv_dtype) \
            else "head dim"
        print(f"kv cache: {len(g.layers)} layers ({kinds}), {g.kv_dtype}, pages of {g.page_size} tokens "
              f"[pages, 2 (K, V), {g.page_size}, kv heads, {row}] per layer")
        print(f"step limits: {g.max_tokens} tokens, {g.max_seqs} sequences per step; context {g.max_context}; "
              f"vocab {g.vocab}; stop ids {list(g.stop_token_ids)}; tokenizer {g.tokenizer or 'none'}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .runtime.executor import load

    ids = None
    if a.ids is not None:
        try:
            ids = [int(t) for t in a.ids.split(",") if t.strip()]
        except ValueError:
            raise LLMCError(f"--ids {a.ids!r}: expected comma-separated token ids, e.g. 1,2,3") from None
    from .runtime.tp_run import artifact_tp

    tp = artifact_tp(a.artifact)
    if tp > 1:  # a --tp / --pp artifact: one process per rank (GPU r for rank r)
        return _generate_tp(a, ids, tp)
    options = {} if a.kv_memory is None else {"kv_memory": a.kv_memory}
    llm = load(a.artifact, device=artifact_device(a.artifact), **options)  # a CUDA artifact runs on the GPU
    if not hasattr(llm, "generate"):
        raise LLMCError(f"{a.artifact} has no step function (not a causal LM, or compiled with --no-generate)")
    prompt = a.prompt if ids is None else ids
    stops = None if a.stop_ids is None else [int(t) for t in a.stop_ids.split(",") if t.strip()]
    t = time.perf_counter()
    new: list[int] = []
    shown = ""
    for _, tok in llm.generate(prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                               top_p=a.top_p, seed=a.seed, stop_token_ids=stops, stream=True):
        new.append(tok)
        if llm.tokenizer is not None:  # print the text as it grows (a token may complete a character)
            text = llm.decode(new)
            if text.startswith(shown):
                sys.stdout.write(text[len(shown):])
                shown = text
        else:
            sys.stdout.write(f"{tok} ")
        sys.stdout.flush()
    dt = time.perf_counter() - t
    print()
    _progress(f"{len(new)} tokens in {dt:.2f}s ({len(new) / dt:.1f} tokens/s)")
    return 0


def _generate_tp(a: argparse.Namespace, ids, tp: int) -> int:
    """`llmc generate` of a --tp / --pp artifact: the ranks run under the launcher; rank 0's tokens print."""
    from .runtime.dist.launch import launch

    if ids is None:
        raise LLMCError("a --tp / --pp artifact takes its prompt as --ids (token ids) for now")
    if a.top_k or a.top_p != 1.0 or a.stop_ids is not None:
        raise LLMCError("with a --tp / --pp artifact, generate takes --max-new-tokens, --temperature and --seed")
    device = read_manifest_device(a.artifact)
    argv = [sys.executable, "-m", "llmc.runtime.tp_run", "generate", str(a.artifact), "--ids", ",".join(map(str, ids)),
            "--max-new-tokens", str(a.max_new_tokens), "--temperature", str(a.temperature)]
    argv += [] if a.seed is None else ["--seed", str(a.seed)]
    argv += [] if a.kv_memory is None else ["--kv-memory", str(a.kv_memory)]
    _progress(f"{a.artifact}: {tp} ranks" + (" (GPU r for rank r)" if device == "cuda" else ""))
    out = io.StringIO()
    res = launch(argv, tp, stdout=out, label=False, check=False)
    if not res.ok:
        raise LLMCError(f"parallel generate ({tp} ranks) failed:\n{res.report()}")
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("{"))
    print(" ".join(map(str, json.loads(line)["token_ids"][0])))
    return 0


def read_manifest_device(artifact) -> str:
    from .runtime.artifact_files import read_manifest
    from .runtime.tp_run import rank_path

    return read_manifest(rank_path(artifact, 0)).device


def _replica_flags(a: argparse.Namespace) -> list[str]:
    """The `llmc serve` options each replica of --dp / --ray gets (all but where it listens):
    the engine's and the API's settings, the same for every replica."""
    flags = ["--policy", a.policy, "--max-queue", str(a.max_queue), "--preemption", a.preemption,
             "--swap-space", str(a.swap_space),
             "--log-level", a.log_level if a.log_level in ("debug", "error", "critical") else "warning"]
    for opt, value in (("--max-num-batched-tokens", a.max_num_batched_tokens), ("--max-num-seqs", a.max_num_seqs),
                       ("--kv-memory", a.kv_memory), ("--api-key", a.api_key),
                       ("--served-model-name", a.served_model_name or pathlib.Path(a.artifact).name),
                       ("--chat-template", a.chat_template and str(pathlib.Path(a.chat_template).resolve()))):
        if value is not None:
            flags += [opt, str(value)]
    flags += [f for f, on in (("--no-prefix-cache", a.no_prefix_cache),
                              ("--no-chunked-prefill", a.no_chunked_prefill)) if on]
    return flags


def _serve_replicated(a: argparse.Namespace) -> int:
    """--dp K (K > 1) or --ray: replicas of the single server behind one front."""
    from .runtime.artifact_files import read_manifest
    from .runtime.manifest import MANIFEST
    from .runtime.tp_run import artifact_tp, rank_path

    art = pathlib.Path(a.artifact)
    # a tensor-parallel artifact (rank0 .. rankN-1): each replica is a group of N ranks, N GPUs
    tp = artifact_tp(art) if not (art / MANIFEST).exists() and (art / "rank0").is_dir() else 1
    first = rank_path(art, 0) if tp > 1 else art
    manifest = read_manifest(first)  # a missing or damaged artifact fails before any replica starts
    if manifest.generation is None:
        raise LLMCError(f"{a.artifact} has no step function (not a causal LM, or compiled with --no-generate)")
    if a.dp < 1:
        raise LLMCError(f"--dp must be >= 1, got {a.dp}")
    if a.max_restarts < 0:
        raise LLMCError(f"--max-restarts must be >= 0, got {a.max_restarts}")
    if a.ray_max_replicas is not None and a.ray_max_replicas < a.dp:
        raise LLMCError(f"--ray-max-replicas {a.ray_max_replicas} is below --dp {a.dp} (the autoscaler's minimum)")
    try:
        devices = None if a.devices is None else [int(d) for d in a.devices.split(",")]
    except ValueError:
        raise LLMCError(f"--devices {a.devices}: expected GPU indices such as 0,1") from None
    if a.ray:
        from .runtime.serve.ray_deploy import serve_ray

        return serve_ray(str(art.resolve()), _replica_flags(a), a.dp, a.ray_max_replicas, a.host, a.port,
                         address=a.ray_address, gpus=tp if manifest.device.startswith("cuda") else 0,
                         progress=_progress)
    try:
        from .runtime.serve.dp_front import serve_dp
    except ImportError as e:  # httpx / aiohttp: the serve extra
        raise LLMCError(f"llmc serve --dp needs the serve extra (pip install 'llmc[serve]'): {e}") from None
    from .runtime.serve.dp_supervisor import DpConfig
    from .runtime.serve.replica_process import placement

    where = placement(a.dp, manifest.device, devices, gpus_per_replica=tp)
    return serve_dp(str(art.resolve()), _replica_flags(a), [e for e, _ in where], [w for _, w in where], a.host,
                    a.port, DpConfig(restart=a.restart_replicas, max_restarts=a.max_restarts),
                    chat_template=a.chat_template, log_level=a.log_level, priced_from=str(first.resolve()))


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from .runtime.serve.server import serve
    except ImportError as e:  # fastapi / uvicorn are the optional `serve` extra
        raise LLMCError(f"llmc serve needs the serve extra (pip install 'llmc[serve]'): {e}") from None
    from .runtime.serve.engine import EngineConfig

    if not a.ray and (a.ray_address is not None or a.ray_max_replicas is not None):
        raise LLMCError("--ray-address and --ray-max-replicas go with --ray")
    if a.dp != 1 or a.ray or a.devices is not None:
        return _serve_replicated(a)
    from .runtime.tp_run import artifact_tp

    tp = artifact_tp(a.artifact)
    if tp > 1:
        return _serve_tp(a, tp)

    config = EngineConfig(policy=a.policy, max_num_batched_tokens=a.max_num_batched_tokens,
                          max_num_seqs=a.max_num_seqs, chunked_prefill=not a.no_chunked_prefill,
                          prefix_cache=not a.no_prefix_cache, preemption=a.preemption, swap_space=a.swap_space,
                          max_queue=a.max_queue)
    return serve(a.artifact, a.host, a.port, config, kv_memory=a.kv_memory, api_key=a.api_key,
                 model_name=a.served_model_name, chat_template=a.chat_template, log_level=a.log_level)


def _serve_tp(a: argparse.Namespace, tp: int) -> int:
    """A --tp or --pp artifact: one process per rank under the launcher (GPU r for rank r); rank 0
    (the first shard, or the first pipeline stage) serves, the others follow its steps. A rank that
    dies stops the others and the command fails."""
    from .runtime.dist.launch import launch

    if a.preemption == "swap":
        raise LLMCError("--preemption swap is not offered with a --tp / --pp artifact (each rank holds its own heads' "
                        "or layers' pages): a parallel server preempts by recompute")
    from .runtime.artifact_files import read_manifest
    from .runtime.tp_run import rank_path

    par = read_manifest(rank_path(a.artifact, 0)).parallel
    device = read_manifest_device(a.artifact)
    argv = [sys.executable, "-m", "llmc.runtime.tp_run", "serve", str(a.artifact), "--host", a.host,
            "--port", str(a.port), "--policy", a.policy, "--max-queue", str(a.max_queue), "--log-level", a.log_level]
    for opt, value in (("--max-num-batched-tokens", a.max_num_batched_tokens), ("--max-num-seqs", a.max_num_seqs),
                       ("--kv-memory", a.kv_memory), ("--api-key", a.api_key),
                       ("--served-model-name", a.served_model_name), ("--chat-template", a.chat_template)):
        if value is not None:
            argv += [opt, str(value)]
    argv += [f for f, on in (("--no-prefix-cache", a.no_prefix_cache),
                             ("--no-chunked-prefill", a.no_chunked_prefill)) if on]
    how = f"tp {par.tp} x pp {par.pp} = {tp} ranks" if par.pp > 1 else f"tensor-parallel over {tp} ranks"
    _progress(f"{a.artifact}: {how}" + (" (GPU r for rank r)" if device == "cuda" else ""))
    res = launch(argv, tp, check=False)
    if not res.ok:
        print(res.report(), file=sys.stderr)
    return res.exit_code


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from .bench_serve import main_bench_serve

    return main_bench_serve(a)


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import main_bench

    return main_bench(a)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has a meaningful one: not for flags, not for
    unset options), keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = _HelpFormatter
    p = argparse.ArgumentParser(prog="llmc", description="Compile transformer graphs to TVM kernels and run them.",
                                epilog=USAGE, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"llmc {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a model to an artifact folder", formatter_class=fmt)
    c.add_argument("src", help="model.onnx | Hugging Face model folder | pkg.module:function | bundled example "
                               "(minilm, tiny-gpt2, tiny-llama, tiny-qwen2, tiny-mistral, tiny-bert). llmc never "
                               "downloads: for a Hub id, download the folder and pass its path")
    c.add_argument("-o", "--output", required=True, help="artifact folder to write")
    c.add_argument("--force", action="store_true", help="replace an existing artifact at --output")
    c.add_argument("--target", default="llvm", help="llvm[:CPU] | cuda[:sm_XX] | rocm[:gfxXXX] | metal; plain llvm "
                                                    "builds for the portable x86-64-v3 baseline")
    c.add_argument("--cpu", metavar="NAME", help="sugar for --target llvm:NAME (native: the build host's CPU)")
    c.add_argument("--seq-len", type=int, default=512, help="largest sequence length the artifact accepts")
    c.add_argument("--batch", type=int, default=8, help="largest batch size the artifact accepts")
    c.add_argument("--dim", action="append", default=[], metavar="NAME=LO:HI",
                   help="bounds of a dynamic dim (repeat). ONNX: any dim name of the file; PyTorch: batch or seq")
    c.add_argument("--report", action="store_true", help="print what each pass fused and the memory plan")
    c.add_argument("--no-fuse", action="store_true", help="one kernel per op (for debugging)")
    c.add_argument("--verify-each", action="store_true", help="run the IR verifier after every pass")
    c.add_argument("--dump-ir", metavar="DIR", help="write the printed IR after each pass into DIR")
    c.add_argument("--weights", choices=["all", "none"], default="all",
                   help="none: a perf artifact without its large weights (the CUDA runtime fills random values)")
    c.add_argument("--no-shim", action="store_true", help="cuda: build every kernel with TVM (no cuBLASLt / "
                                                           "flash-attention offload)")
    c.add_argument("--no-blas", action="store_true", help="cpu: build the GEMMs and attention with TVM too (no library calls)")
    c.add_argument("--tp", type=int, default=1, metavar="N", help="tensor parallelism: shard for N ranks (one "
                   "artifact per rank, OUTPUT/rank0 ..; run with `llmc generate/serve --tp N`)")
    c.add_argument("--pp", type=int, default=1, metavar="M", help="pipeline parallelism: the step function cut "
                   "into M stages by layers (OUTPUT/rank0 ..; one process and GPU each; with --tp N: N x M ranks, "
                   "rank = stage * N + shard)")
    c.add_argument("--no-generate", action="store_true", help="causal LMs: the forward only, no step function")
    c.add_argument("--generate", action="store_true", help="require the step function (fail, naming the node, "
                                                           "where the graph does not allow one)")
    c.add_argument("--page-size", type=int, default=16, help="KV cache page, in tokens")
    c.add_argument("--max-step-tokens", type=int, default=256, help="tokens per step (longer prompts are "
                                                                    "read in chunks)")
    c.add_argument("--max-seqs", type=int, default=32, help="sequences per step")
    q = c.add_argument_group("quantization (docs/quantization.md)")
    q.add_argument("--quant", metavar="{int8,int4,w8a8,fp8}",
                   help="weight-only int8 (per channel) or int4 (groups); w8a8 (int8 weights and per-token int8 "
                        "activations) or fp8 (e4m3 weights and activations), CPU; embeddings and the LM head "
                        "stay float")
    q.add_argument("--group", type=int, help="int4 group size: 32, 64 or 128 (default 128); must divide every K")
    q.add_argument("--sym", action="store_true", help="int4: symmetric (zero point 8, no zeros stored)")
    q.add_argument("--method", help="rtn (default) | gptq | awq; w8a8: rtn | smoothquant (gptq, awq and "
                                    "smoothquant need --calib); with --sparsity: "
                                    "magnitude (default) | sparsegpt (needs --calib)")
    q.add_argument("--calib", metavar="FILE", help="calibration text (tokenized with the model's tokenizer)")
    q.add_argument("--calib-samples", type=int, help="token windows read from --calib (default 32)")
    q.add_argument("--quant-lm-head", action="store_true",
                   help="quantize the LM head too (a tied embedding then reads the same packed table)")
    q.add_argument("--kv-cache-dtype", metavar="{int8,fp8}",
                   help="store the paged KV cache as int8 or fp8 (e4m3) codes with a scale per token and head (CPU)")
    q.add_argument("--sparsity", metavar="2:4", help="prune the matmul weights to 2:4 along K (before --quant)")
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("run", help="run an artifact on .npy/.npz inputs", formatter_class=fmt)
    r.add_argument("artifact")
    r.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE",
                   help="NAME=x.npy, x.npy (model input order) or x.npz (arrays by input name); repeat")
    r.add_argument("-o", "--output", help="write the outputs to this .npz (checked before running)")
    r.add_argument("--device", help="cpu | cuda[:N]; default: the device the artifact was built for")
    r.set_defaults(fn=cmd_run)
    b = sub.add_parser("bench", help="time an artifact on the GPU against torch eager / torch.compile",
                       formatter_class=fmt)
    b.add_argument("artifact")
    b.add_argument("--model", required=True, help="pkg.module:function building the same model in torch "
                                                  "(e.g. llmc.bench_models:llama_1b)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--seq", type=int, default=512)
    b.add_argument("--modes", default="eager,max-autotune-no-cudagraphs,reduce-overhead",
                   help="comma-separated torch runs: eager, default, max-autotune-no-cudagraphs, reduce-overhead, ...")
    b.add_argument("--iters", type=int, default=50)
    b.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    b.add_argument("--json", help="also write the results here")
    b.set_defaults(fn=cmd_bench)
    i = sub.add_parser("inspect", help="show an artifact's inputs, outputs, kernels and weight bytes",
                       formatter_class=fmt)
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    i.set_defaults(fn=cmd_inspect)

    g = sub.add_parser("generate", help="generate text with a causal LM artifact, printing tokens as they come",
                       formatter_class=fmt)
    g.add_argument("artifact")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (the artifact must carry a tokenizer)")
    src.add_argument("--ids", help="prompt token ids, comma-separated: 1,2,3")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="seed for sampling (reproducible tokens)")
    g.add_argument("--stop-ids", help="comma-separated ids that end generation (default: the model's end ids; "
                                      "'' for none)")
    g.add_argument("--kv-memory", type=int, help="bytes of KV cache (default: what the step limits can use, "
                                                 "up to 512 MiB)")
    g.set_defaults(fn=cmd_generate)
    add_serve_parsers(sub, fmt)
    from .distill.cli import add_parser as add_distill_parser  # argparse only: torch loads when it runs

    add_distill_parser(sub, fmt)
    return p


def add_serve_parsers(sub, fmt) -> None:
    s = sub.add_parser("serve", help="serve a causal LM artifact over OpenAI's HTTP API (continuous batching)",
                       formatter_class=fmt)
    s.add_argument("artifact")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--policy", choices=["fcfs", "mlfq"], default="fcfs",
                   help="fcfs: arrival order; mlfq: FastServe's skip-join multi-level feedback queue")
    s.add_argument("--max-num-batched-tokens", type=int, help="tokens per step (default: the step function's limit)")
    s.add_argument("--max-num-seqs", type=int, help="sequences per step (default: the step function's limit)")
    s.add_argument("--kv-memory", type=int, metavar="BYTES", help="bytes of KV cache (default: what the step "
                                                                  "limits can use, up to 512 MiB)")
    s.add_argument("--max-queue", type=int, default=1024, help="accepted requests not yet started; more get 429")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/")
    s.add_argument("--no-prefix-cache", action="store_true", help="do not share the K/V of common prompt prefixes")
    s.add_argument("--no-chunked-prefill", action="store_true",
                   help="whole prompts in steps of their own (decodes wait), as vLLM before chunked prefill")
    s.add_argument("--preemption", choices=["auto", "swap", "recompute"], default="auto",
                   help="when KV pages run out: auto picks the cheaper of swapping and recomputing")
    s.add_argument("--swap-space", type=int, default=4 << 30, metavar="BYTES",
                   help="host memory for swapped-out K/V")
    s.add_argument("--served-model-name", help="the model name clients ask for (default: the artifact folder's name)")
    s.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template (default: the artifact's, else "
                                                           "a plain one)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    d = s.add_argument_group("data parallelism (docs/parallel.md)")
    d.add_argument("--dp", type=int, default=1, metavar="K",
                   help="K replicas (processes, one GPU each) behind one front that routes each request to the "
                        "replica with the least outstanding tokens")
    d.add_argument("--devices", metavar="LIST", help="GPU indices, one per replica (default 0..K-1)")
    d.add_argument("--restart-replicas", action=argparse.BooleanOptionalAction, default=True,
                   help="restart a replica that dies; with --no-restart-replicas the server exits non-zero")
    d.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="deaths of one replica within 5 minutes that are still restarted")
    d.add_argument("--ray", action="store_true", help="run the K replicas as a Ray Serve deployment (the cluster "
                                                      "extra: pip install 'llmc[cluster]')")
    d.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster (default: start a local one)")
    d.add_argument("--ray-max-replicas", type=int, metavar="M",
                   help="with --ray: autoscale between K and this many replicas")
    s.set_defaults(fn=cmd_serve)

    b = sub.add_parser("bench-serve", help="load-test a running `llmc serve` (vLLM benchmark_serving's measures)",
                       formatter_class=fmt)
    b.add_argument("--base-url", default="http://127.0.0.1:8000")
    b.add_argument("--model", help="default: the server's one model")
    b.add_argument("--api-key")
    b.add_argument("--dataset", choices=["sharegpt", "heavy-tail", "prefix"], default="sharegpt",
                   help="sharegpt: ShareGPT-like log-normal prompt/output lengths; heavy-tail: mostly short outputs, "
                        "a few long; prefix: multi-turn chats over a long history (cold vs warm first token)")
    b.add_argument("--num-prompts", type=int, default=100)
    b.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (inf: all at once)")
    b.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    b.add_argument("--history-tokens", type=int, default=1000, help="prefix dataset: tokens of chat history")
    b.add_argument("--goodput", default="ttft:1000,tpot:100",
                   help="SLOs in ms a request must meet to count for goodput (ttft, tpot, e2el)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="also write the results here")
    b.set_defaults(fn=cmd_bench_serve)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if getattr(a, "batch", 2) < 1 or getattr(a, "seq_len", 2) < 1:
        p.error("--batch and --seq-len must be positive")
    try:
        code = a.fn(a)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
        return code
    except LLMCError as e:
        print(f"llmc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `llmc inspect x | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and exit like SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
