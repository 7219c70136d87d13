"""Decode and prefill through llmc's step function on one GPU, against HF + torch.compile
(mode="reduce-overhead") + StaticCache in the same process (../shared/tools/decode_baseline.py's loop).

Build host (no GPU): a generation artifact of the Llama-3.2-1B shape without its weights

    llmc compile llmc.bench_models:llama_1b -o gpu_art/gen/llama1b.llmc --target cuda:sm_90 --weights none \
        --batch 1 --seq-len 8448 --generate --max-step-tokens 4096 --max-seqs 16

GPU machine (runtime-only TVM; weights filled with random values on the device):

    python benchmarks/bench_decode_gpu.py --art gpu_art/gen/llama1b.llmc [--no-torch]
    python benchmarks/bench_decode_gpu.py --art gpu_art/gen/llama1b.llmc --profile
        # kernel by kernel, decode steps as their CUDA graphs replay (CUPTI), then stop
    python benchmarks/bench_decode_gpu.py --quant-only gpu_art/gen/llama1b_int4.llmc gpu_art/gen/llama1b_int8.llmc
        # weight-only quantized artifacts (llmc compile ... --quant int4 --group 128 --sym) against
        # the bf16 --art: decode steps at batch 1 and 16, same run
    python benchmarks/bench_decode_gpu.py --quant-only gpu_art/p8/fp8.llmc --art gpu_art/p8/bf16.llmc --quant-prefill 8x512
        # and prefill steps of 8 prompts x 512 tokens (artifacts compiled with --max-step-tokens 4096)

Figures (ms are medians over the timed steps):
- decode step, batch B at context C: token ids and page metadata copied in, the captured
  graph replayed, synchronized (logits stay on the GPU, as the baseline's argmax does);
  the floor is weight bytes (plus the KV bytes the step reads) over the copy bandwidth
  measured here (bytes read + written per second, as decode_baseline.py measures it);
- the generate loop: llm.generate(), 256 new tokens, host overhead and logits copies included;
- prefill 1 x 512 through the step function against the forward entry point of the same
  artifact, and the paged attention's TFLOP/s over an 8 x 512 causal prefill step.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def copy_bandwidth(torch) -> float:
    x = torch.empty(1024**3, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    del x, y
    return 2 * 1024**3 * 2 * 10 / (s.elapsed_time(e) / 1e3)


def torch_decode_ms(torch, T, batch: int, context: int, steps: int) -> float:
    """decode_baseline.py's loop: HF + torch.compile(reduce-overhead) + StaticCache, ms per step."""
    cfg = T.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8448,
                        rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    cache = T.StaticCache(config=cfg, max_batch_size=batch, max_cache_len=context + steps + 8, device="cuda",
                          dtype=torch.bfloat16)
    ids = torch.randint(0, 32000, (batch, context), device="cuda")
    times = []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(context, device="cuda"))
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            pos = torch.tensor([context + i], device="cuda")
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = step(tok, past_key_values=cache, cache_position=pos, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    del model, step, cache
    torch.cuda.empty_cache()
    return float(np.median(times[steps // 2:])) * 1e3


def _zero_pool(llm) -> None:
    for c in llm.pool.caches:  # the benchmark reads histories it never wrote: make them zeros, not NaN
        c.copyfrom(np.zeros(tuple(c.shape), _np_dtype(str(c.dtype))))  # (uint8 rows for a quantized cache)


def _np_dtype(name):
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name)) if name == "bfloat16" else np.dtype(name)


def _decode_inputs(llm, pages: list[list[int]], lens: list[int], rng) -> dict:
    b = len(lens)
    cols = max(len(p) for p in pages)
    table = np.zeros((b, cols), np.int32)
    for i, p in enumerate(pages):
        table[i, :len(p)] = p
    return {"tokens": rng.integers(0, 32000, b).astype(np.int64), "positions": np.asarray(lens, np.int64) - 1,
            "logit_rows": np.arange(b, dtype=np.int64), "page_table": table,
            "kv_lens": np.asarray(lens, np.int32), "q_starts": np.arange(b + 1, dtype=np.int32),
            **{f"kv_cache.{i}": c for i, c in enumerate(llm.pool.caches)}}


def llmc_decode(llm, batch: int, context: int, steps: int, rng) -> dict:
    pool = llm.pool
    pages = [pool.take(pool.pages_for(context + steps + 1)) for _ in range(batch)]
    ex = llm.step.executor
    times, dev_ms = [], []
    try:
        for i in range(steps):
            inputs = llm.step.padded(_decode_inputs(llm, pages, [context + i + 1] * batch, rng))
            ex.synchronize()
            t = time.perf_counter()
            ex.run(**inputs, outputs="device")
            ex.synchronize()
            times.append(time.perf_counter() - t)
        assert ex.graph_state(**inputs).startswith("captured"), ex.graph_state(**inputs)
        # device time alone: replays back to back
        ex.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            ex.replay(**inputs)
        ex.synchronize()
        dev_ms = (time.perf_counter() - t) / 20 * 1e3
    finally:
        for p in pages:
            pool.give_back(p)
    return {"step_ms": float(np.median(times[steps // 2:])) * 1e3, "replay_ms": dev_ms}


def decode_profile(llm, batch: int, context: int, rng, iters: int = 20) -> str:
    """Kernel by kernel, one decode step as its CUDA graph replays (CUPTI through torch.profiler, so
    small kernels are timed without the gaps per-kernel events would add): the kernel table, and how
    much of the replay's wall time no kernel was running (launch latency between graph nodes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from profile_gpu import kernel_table

    pool = llm.pool
    pages = [pool.take(pool.pages_for(context + 2)) for _ in range(batch)]
    ex = llm.step.executor
    try:
        inputs = llm.step.padded(_decode_inputs(llm, pages, [context + 1] * batch, rng))
        for _ in range(3):
            ex.run(**inputs, outputs="device")
        for _ in range(5):
            ex.replay(**inputs)
        ex.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                ex.replay(**inputs)
            ex.synchronize()
    finally:
        for p in pages:
            pool.give_back(p)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, spans[0][0]
    for s, e in spans:  # the union of kernel intervals
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    wall = spans[-1][1] - spans[0][0]
    return (kernel_table(prof, f"decode step, batch {batch} @ {context} (graph replay)", iters, top=40)
            + f"\n  GPU busy {busy / iters:.1f} us of {wall / iters:.1f} us per step "
              f"(idle between kernels {(wall - busy) / iters:.1f} us)")


def prefill(llm, seqs: int, length: int, rng, profile: bool) -> dict:
    """One step reading `seqs` prompts of `length` tokens from scratch (graph captured)."""
    pool = llm.pool
    pages = [pool.take(pool.pages_for(length)) for _ in range(seqs)]
    ex = llm.step.executor
    try:
        cols = llm.step.columns(max(len(p) for p in pages))
        table = np.zeros((seqs, cols), np.int32)
        for i, p in enumerate(pages):
            table[i, :len(p)] = p
        inputs = {"tokens": rng.integers(0, 32000, seqs * length).astype(np.int64),
                  "positions": np.tile(np.arange(length), seqs).astype(np.int64),
                  "logit_rows": (np.arange(1, seqs + 1) * length - 1).astype(np.int64), "page_table": table,
                  "kv_lens": np.full(seqs, length, np.int32),
                  "q_starts": (np.arange(seqs + 1) * length).astype(np.int32),
                  **{f"kv_cache.{i}": c for i, c in enumerate(pool.caches)}}
        graphs, ex.graphs = ex.graphs, True
        try:
            ex.run(**inputs, outputs="device")
            ex.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                ex.replay(**inputs)
            ex.synchronize()
            ms = (time.perf_counter() - t) / 10 * 1e3
        finally:
            ex.graphs = graphs
        out = {"step_ms": ms}
        if profile:
            prof = ex.profile(**inputs, repeat=5)
            paged = [t for name, t in prof if ex._kernels[name][1].func.startswith("llmc_paged_attention")]
            flops = 4 * seqs * (length * (length + 1) / 2) * 64 * 32 * len(paged)
            out["attention_ms"] = float(sum(paged))
            out["attention_TFLOPs"] = flops / (sum(paged) / 1e3) / 1e12
            out["step_profile_ms"] = float(sum(t for _, t in prof))
    finally:
        for p in pages:
            pool.give_back(p)
    return out


def forward_ms(llm, length: int, rng) -> float:
    ex = llm.forward
    ids = rng.integers(0, 32000, (1, length)).astype(np.int64)
    ex.run(input_ids=ids, outputs="device")
    ex.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        ex.replay(input_ids=ids)
    ex.synchronize()
    return (time.perf_counter() - t) / 10 * 1e3


def step_weight_bytes(llm) -> int:
    from llmc.runtime.executor import numpy_dtype

    return sum(int(np.prod(t.shape)) * numpy_dtype(str(t.dtype)).itemsize
               for t in llm.step.executor.device_tensors().values())


def _prefill_shapes(llm, shapes) -> list[tuple[int, int]]:
    return [(n, length) for n, length in shapes if n * length <= llm.spec.max_tokens and n <= llm.spec.max_seqs]


def quant_decode(base, arts: list[str], steps: int, bw: float, rng, prefill_shapes=()) -> None:
    """Decode steps (and with prefill_shapes, prefill steps: n prompts of length tokens, graph
    replayed) of each quantized artifact against the bf16 one, loaded side by side."""
    import llmc

    shapes = ((1, 512), (16, 512))
    ref = {s: llmc_decode(base, *s, steps, rng)["step_ms"] for s in shapes}
    pre = {s: prefill(base, *s, rng, profile=False)["step_ms"] for s in _prefill_shapes(base, prefill_shapes)}
    wb = step_weight_bytes(base)
    print(f"bf16: step weights {wb / 1e9:.3f} GB; " + ", ".join(f"batch {b} @ {c}: {ref[(b, c)]:.3f} ms"
                                                              for b, c in shapes)
          + "".join(f"; prefill {n} x {length}: {t:.3f} ms" for (n, length), t in pre.items()), flush=True)
    for art in arts:
        llm = llmc.load(art, device="cuda", kv_memory=1200 << 20)
        _zero_pool(llm)
        qb = step_weight_bytes(llm)
        for (n, length), t in pre.items():
            if (n, length) in _prefill_shapes(llm, [(n, length)]):
                q = prefill(llm, n, length, rng, profile=False)["step_ms"]
                print(json.dumps({"art": art, "prefill": f"{n}x{length}", "step_ms": q, "bf16_step_ms": t,
                                  "speedup_vs_bf16": t / q}), flush=True)
        for b, c in shapes:
            r = llmc_decode(llm, b, c, steps, rng)
            print(json.dumps({"art": art, "batch": b, "context": c, "step_ms": r["step_ms"], "replay_ms": r["replay_ms"],
                              "bf16_step_ms": ref[(b, c)], "speedup_vs_bf16": ref[(b, c)] / r["step_ms"],
                              "weight_GB": qb / 1e9, "weight_ratio_vs_bf16": qb / wb,
                              "floor_ms": qb / bw * 1e3}), flush=True)
        del llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--art", default="gpu_art/gen/llama1b.llmc")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of decode steps (CUPTI, graph replays), then stop")
    ap.add_argument("--quant-only", nargs="+", metavar="ART", help="quantized artifacts: decode against --art, then stop")
    ap.add_argument("--quant-prefill", nargs="*", default=[], metavar="NxL",
                    help="with --quant-only, also prefill steps of N prompts of L tokens (e.g. 8x512) against --art")
    a = ap.parse_args()
    import torch
    import transformers as T

    import llmc

    rng = np.random.default_rng(0)
    bw = copy_bandwidth(torch)
    llm = llmc.load(a.art, device="cuda", kv_memory=1200 << 20)
    weight_bytes = step_weight_bytes(llm)
    _zero_pool(llm)
    layout = llm.layout
    res = {"copy_TBps": bw / 1e12, "weight_GB": weight_bytes / 1e9, "rows": []}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; step weights {weight_bytes / 1e9:.3f} GB; "
          f"floor {weight_bytes / bw * 1e3:.3f} ms", flush=True)
    if a.quant_only:
        return quant_decode(llm, a.quant_only, a.steps, bw, rng,
                            [tuple(int(v) for v in s.split("x")) for s in a.quant_prefill])
    shapes = [(b, c) for b, c in ((1, 512), (16, 512), (1, 8192)) if c + a.steps <= llm.spec.max_context]
    if a.profile:
        for batch, context in shapes:
            print(decode_profile(llm, batch, context, rng), flush=True)
        return
    for batch, context in shapes:  # (context 8192 needs an artifact compiled for it)
        r = llmc_decode(llm, batch, context, a.steps, rng)
        kv_bytes = batch * context * layout.page_bytes / layout.page_size
        floor = (weight_bytes + kv_bytes) / bw * 1e3
        row = {"batch": batch, "context": context, **r, "floor_ms": floor, "kv_GB": kv_bytes / 1e9}
        if not a.no_torch:
            row["torch_compile_ms"] = torch_decode_ms(torch, T, batch, context, a.steps)
            row["speedup_vs_torch"] = row["torch_compile_ms"] / r["step_ms"]
            row["tok_s"], row["torch_tok_s"] = batch / r["step_ms"] * 1e3, batch / row["torch_compile_ms"] * 1e3
        row["vs_floor"] = r["step_ms"] / floor
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    # the whole generate loop, host overhead included
    prompt = rng.integers(0, 32000, 512).tolist()
    llm.generate([prompt], max_new_tokens=8, stop_token_ids=())  # warm-up (plans, graphs)
    t = time.perf_counter()
    out = llm.generate([prompt], max_new_tokens=256, stop_token_ids=())
    dt = time.perf_counter() - t
    res["generate_tok_s"] = len(out[0].token_ids) / dt
    print(f"generate loop, batch 1, prompt 512, 256 new: {res['generate_tok_s']:.0f} tok/s ({dt:.2f} s)", flush=True)
    p1 = prefill(llm, 1, 512, rng, profile=False)
    f1 = forward_ms(llm, 512, rng)
    res["prefill_1x512"] = {**p1, "forward_ms": f1, "ratio_step_vs_forward": p1["step_ms"] / f1}
    print("prefill 1x512:", json.dumps(res["prefill_1x512"]), flush=True)
    p8 = prefill(llm, 8, 512, rng, profile=True)
    res["prefill_8x512"] = p8
    print("prefill 8x512:", json.dumps(p8), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
