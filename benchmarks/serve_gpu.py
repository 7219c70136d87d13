"""The GPU serving figures of benchmarks/RESULTS.md: `llmc serve` (a real HTTP server, probed by
`llmc bench-serve`'s client) against a static-batching baseline, in one run on one GPU.

    python3 benchmarks/serve_gpu.py ART [--which static chunk mlfq] [--rate 24] [--num-prompts 300]

ART: a CUDA generation artifact of the Llama-3.2-1B shape, e.g.
    llmc compile llmc.bench_models:llama_1b -o ART --target cuda:sm_90 --weights none --batch 1 \\
        --seq-len 2048 --generate --max-step-tokens 2048 --max-seqs 128

- static: at --rate requests/s (Poisson) over ShareGPT-like lengths (llmc/bench_serve.py), llmc's
  continuous batching against static batching: Hugging Face + torch.compile(mode="reduce-overhead") +
  StaticCache (the decode loop of ../shared/tools/decode_baseline.py), batches of up to 16 requests
  taken in arrival order once the GPU is free, each batch run until its longest output is done
  (prompts left-padded with their mask; the prefill runs eagerly). Same requests, same arrival
  times. Both stream: a request's token time is the step that made it.
- chunk: p99 inter-token latency with chunked prefill (--max-num-batched-tokens 512) and
  without (--no-chunked-prefill), same requests and rate.
- mlfq: mean job completion time (E2EL) on a heavy-tailed output mix, fcfs against mlfq, all
  requests at once.
Outputs are fixed-length (ignore_eos), random weights: only the work matters.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from llmc.bench_serve import Timeline, heavy_tail, run_load, sharegpt_like, summarize

PORT = 8321
URL = f"http://127.0.0.1:{PORT}"


def log(msg: str) -> None:
    print(f"[serve_gpu] {msg}", file=sys.stderr, flush=True)


# --- llmc: a real server in a child process -------------------------------------------------
class Server:
    def __init__(self, art: str, *flags: str):
        cmd = [sys.executable, "-m", "llmc", "serve", art, "--port", str(PORT), "--log-level", "warning",
               "--served-model-name", "m", *flags]
        self.proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
        import httpx

        t = time.time()
        while time.time() - t < 300:
            if self.proc.poll() is not None:
                raise SystemExit(f"llmc serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{URL}/health", timeout=2).status_code == 200:
                    log(f"server up in {time.time() - t:.1f} s: {' '.join(flags)}")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("llmc serve did not come up in 300 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def llmc_load(art: str, flags: list[str], work, rate: float, seed: int, warm) -> dict:
    srv = Server(art, *flags)
    try:
        asyncio.run(run_load(URL, "m", warm, float("inf"), None, {}, np.random.default_rng(0)))  # shapes, graphs
        results, dur, rss, delta = asyncio.run(run_load(URL, "m", work, rate, None, {}, np.random.default_rng(seed)))
    finally:
        srv.stop()
    res = summarize(results, dur, {})
    res["server_counters"] = {k.removeprefix("llmc_"): v for k, v in delta.items() if v}
    return res


# --- the static-batching baseline -----------------------------------------------------------
class StaticBatching:
    """HF + torch.compile(reduce-overhead) + StaticCache, batches of `batch` run to completion."""

    def __init__(self, context: int, batch: int = 16):
        import torch
        import transformers as T

        self.torch, self.batch, self.context = torch, batch, context
        cfg = T.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                            max_position_embeddings=context, rope_theta=500000.0, tie_word_embeddings=True)
        torch.manual_seed(0)
        with torch.device("cuda"):
            self.model = T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        self.cfg, self.caches = cfg, {}
        # one compiled graph per cache length (dynamic=False: static shapes, as reduce-overhead wants)
        self.step = torch.compile(self.model, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def cache_for(self, need: int):
        """A StaticCache of the smallest power-of-two length (>= 512) that holds `need` positions:
        a batch's padded prompt plus its longest output can pass the context, and one cache of the
        largest length for every batch would make each step attend over far more keys than needed."""
        n = 512
        while n < need:
            n *= 2
        if n not in self.caches:
            import transformers as T

            self.caches[n] = T.StaticCache(config=self.cfg, max_batch_size=self.batch, max_cache_len=n,
                                           device="cuda", dtype=self.torch.bfloat16)
        return n, self.caches[n]

    def run_batch(self, reqs: list[tuple[list[int], int, Timeline]], need: int = 0) -> None:
        torch = self.torch
        rows = reqs + [reqs[0]] * (self.batch - len(reqs))  # empty rows repeat the first request (same work)
        width = max(len(p) for p, _, _ in rows)
        length, cache = self.cache_for(max(need, width + max(o for _, o, _ in rows)))
        ids = torch.zeros((self.batch, width), dtype=torch.long)
        mask = torch.ones((self.batch, length), dtype=torch.long)
        for r, (p, _, _) in enumerate(rows):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, :width - len(p)] = 0
        ids, mask = ids.cuda(), mask.cuda()
        start = (mask[:, :width] == 0).sum(1, keepdim=True)  # each row's padding
        cache.reset()
        with torch.no_grad():
            out = self.model(ids, attention_mask=mask, position_ids=(torch.arange(width, device="cuda") - start).clamp(min=0),
                             past_key_values=cache, cache_position=torch.arange(width, device="cuda"), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            now = time.perf_counter()
            for _, _, t in reqs:
                t.token_times.append(now)
            for i in range(1, max(o for _, o, _ in reqs)):
                pos = width - 1 + i
                out = self.step(tok, attention_mask=mask, position_ids=pos - start,
                                past_key_values=cache, cache_position=torch.tensor([pos], device="cuda"),
                                use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                now = time.perf_counter()
                for _, o, t in reqs:
                    if len(t.token_times) < o:
                        t.token_times.append(now)
        for _, o, t in reqs:
            t.ok = len(t.token_times) == o

    def serve(self, work, rate: float, seed: int) -> tuple[list[Timeline], float]:
        rng = np.random.default_rng(seed)  # the gaps run_load draws with the same seed
        t0 = time.perf_counter()
        arrivals, t = [], t0
        for _ in work:
            arrivals.append(t)
            if np.isfinite(rate):
                t += rng.exponential(1 / rate)
        timelines = [Timeline(len(p), o, start=a) for (p, o), a in zip(work, arrivals)]
        i = 0
        while i < len(work):
            wait = arrivals[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            now = time.perf_counter()
            j = i
            while j < len(work) and j - i < self.batch and arrivals[j] <= now:
                j += 1
            self.run_batch([(work[k][0], work[k][1], timelines[k]) for k in range(i, j)])
            i = j
        return timelines, time.perf_counter() - t0

    def warm(self) -> None:
        """Compile and capture each cache length once, before the clock runs."""
        n = 512
        while n <= 2 * self.context:
            p = [1] * (n // 2)
            ts = [Timeline(len(p), 4, start=time.perf_counter())]
            self.run_batch([(p, 4, ts[0])], need=n)
            n *= 2


# --- reports --------------------------------------------------------------------------------
KEYS = ("completed", "duration_s", "request_throughput", "output_token_throughput")


def brief(name: str, r: dict) -> dict:
    row = {k: round(r[k], 3) if isinstance(r[k], float) else r[k] for k in KEYS}
    for m in ("ttft", "tpot", "itl", "e2el"):
        row[m] = {k: None if v is None else round(v, 2) for k, v in r[m].items()}
    print(f"{name:34s} " + json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("art")
    ap.add_argument("--which", nargs="+", default=["static", "chunk", "mlfq"])
    ap.add_argument("--rate", type=float, nargs="+", default=[24.0])
    ap.add_argument("--num-prompts", type=int, default=300)
    ap.add_argument("--max-num-seqs", type=int, nargs="+", default=[64])
    ap.add_argument("--context", type=int, default=2048, help="the artifact's context")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=512, help="tokens per step with chunked prefill")
    ap.add_argument("--json", help="write every summary here")
    a = ap.parse_args()
    vocab, out = a.vocab, {}
    work = sharegpt_like(a.num_prompts, a.context, vocab, np.random.default_rng(7))
    warm = sharegpt_like(32, a.context, vocab, np.random.default_rng(8))
    log(f"{len(work)} requests: prompts mean {np.mean([len(p) for p, _ in work]):.0f}, "
        f"outputs mean {np.mean([o for _, o in work]):.0f} tokens (sum {sum(o for _, o in work)})")
    if "static" in a.which:
        for rate in a.rate:
            for seqs in a.max_num_seqs:
                r = llmc_load(a.art, ["--max-num-seqs", str(seqs)], work, rate, 11, warm)
                out[f"llmc rate {rate} seqs {seqs}"] = r
                brief(f"llmc rate {rate} max-num-seqs {seqs}", r)
        base = StaticBatching(a.context)
        base.warm()
        for rate in a.rate:
            tl, dur = base.serve(work, rate, 11)
            r = summarize(tl, dur, {})
            out[f"static rate {rate}"] = r
            brief(f"static batching (16) rate {rate}", r)
            for seqs in a.max_num_seqs:
                l = out[f"llmc rate {rate} seqs {seqs}"]
                print(f"rate {rate} seqs {seqs}: output tok/s llmc/static = "
                      f"{l['output_token_throughput'] / r['output_token_throughput']:.2f}x; p99 TPOT llmc "
                      f"{l['tpot']['p99_ms']:.2f} ms vs static {r['tpot']['p99_ms']:.2f} ms", flush=True)
        del base
    if "chunk" in a.which:
        rate = a.rate[0]
        for name, flags in (("chunked", ["--max-num-batched-tokens", str(a.chunk)]),
                            ("no chunking", ["--no-chunked-prefill"])):
            r = llmc_load(a.art, flags + ["--max-num-seqs", str(a.max_num_seqs[0])], work, rate, 11, warm)
            out[f"chunk {name}"] = r
            brief(f"llmc {name} rate {rate}", r)
    if "mlfq" in a.which:
        ht = heavy_tail(a.num_prompts, a.context, vocab, np.random.default_rng(9))
        for policy in ("fcfs", "mlfq"):
            r = llmc_load(a.art, ["--policy", policy, "--max-num-seqs", "16"], ht, float("inf"), 12, warm)
            out[f"mlfq {policy}"] = r
            brief(f"llmc heavy-tail all-at-once {policy}", r)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
