"""`llmc bench-serve`: load-test a running `llmc serve` with vLLM benchmark_serving's measures.

Requests go to /v1/completions as token ids (exact prompt lengths) with `ignore_eos`
(exact output lengths), streamed; each one's timeline gives:
- TTFT: send to first token; TPOT: (latency - TTFT) / (output tokens - 1);
  ITL: every gap between consecutive tokens; E2EL: send to last token (the job completion
  time, JCT, whose mean the fcfs/mlfq comparison uses).
- throughput: completed requests and output tokens per second of the whole run; goodput:
  requests per second that met every SLO given (--goodput ttft:MS,tpot:MS,e2el:MS).
Arrivals are Poisson at --request-rate (exponential gaps) or all at once, optionally
capped at --max-concurrency in flight. Refused requests (429) are counted, not retried.

Datasets are generated here, nothing is downloaded (random token ids, since only lengths
matter to the server's work):
- sharegpt: ShareGPT-like log-normal prompt and output lengths (long right tails; medians
  at 15% of the served context for prompts and 12% for outputs, so they fit the context).
- heavy-tail: short prompts; 85% of outputs short (4-16 tokens), 15% long (half the
  context or more): the mix where FastServe's MLFQ helps against FCFS head-of-line blocking.
- prefix: multi-turn chats over a --history-tokens history, one at a time: the first turn
  is cold, the second re-sends the history and the first reply (prefix-cache warm).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import LLMCError


@dataclass
class Timeline:
    prompt_tokens: int
    max_tokens: int
    ok: bool = False
    status: int = 0
    error: str = ""
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.token_times))


def parse_goodput(spec: str) -> dict[str, float]:
    """'ttft:500,tpot:50' -> {'ttft': 0.5, 'tpot': 0.05} (seconds)."""
    out = {}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition(":")
        if k not in ("ttft", "tpot", "e2el"):
            raise LLMCError(f"--goodput {spec!r}: SLO names are ttft, tpot, e2el (in ms), e.g. ttft:500,tpot:50")
        try:
            out[k] = float(v) / 1000
        except ValueError:
            raise LLMCError(f"--goodput {spec!r}: {v!r} is not a number of milliseconds") from None
    return out


# --- datasets: (prompt ids, max_tokens) lists


def sharegpt_like(n: int, context: int, vocab: int, rng: np.random.Generator) -> list[tuple[list[int], int]]:
    out = []
    for _ in range(n):
        p = int(np.clip(rng.lognormal(math.log(0.15 * context), 0.8), 4, context // 2))
        o = int(np.clip(rng.lognormal(math.log(0.12 * context), 0.9), 1, context - p - 1))
        out.append((rng.integers(0, vocab, p).tolist(), o))
    return out


def heavy_tail(n: int, context: int, vocab: int, rng: np.random.Generator) -> list[tuple[list[int], int]]:
    out = []
    for _ in range(n):
        p = int(rng.integers(8, 33))
        room = context - p - 1
        o = int(rng.integers(room // 2, room + 1)) if rng.random() < 0.15 else int(rng.integers(4, 17))
        out.append((rng.integers(0, vocab, p).tolist(), o))
    return out


# --- the client


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int, headers: dict) -> Timeline:
    t = Timeline(len(prompt), max_tokens)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    t.start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
        t.status = r.status_code
        if r.status_code != 200:
            t.error = (await r.aread()).decode(errors="replace")[:200]
            return t
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                t.error = chunk["error"]["message"]
                return t
            ids = chunk["choices"][0].get("token_ids") or []
            if ids:
                now = time.perf_counter()
                t.token_times.extend([now] * len(ids))
                t.token_ids.extend(ids)
    t.ok = len(t.token_times) == max_tokens
    return t


async def _rss(client, url: str, out: list[float], stop: asyncio.Event) -> None:
    """The server's resident memory, sampled from /metrics every half second."""
    while not stop.is_set():
        m = await _metrics(client, url)
        if "llmc_process_resident_memory_bytes" in m:
            out.append(m["llmc_process_resident_memory_bytes"])
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def _metrics(client, url: str) -> dict[str, float]:
    r = await client.get(f"{url}/metrics")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


async def run_load(url: str, model: str, work: list[tuple[list[int], int]], rate: float, concurrency: int | None,
                   headers: dict, rng: np.random.Generator) -> tuple[list[Timeline], float, list[float], dict]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        rss: list[float] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_rss(client, url, rss, stop))
        before = await _metrics(client, url)

        async def go(p, o):
            if gate is None:
                return await _one(client, url, model, p, o, headers)
            async with gate:
                return await _one(client, url, model, p, o, headers)

        tasks = []
        t0 = time.perf_counter()
        for p, o in work:
            tasks.append(asyncio.create_task(go(p, o)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.exponential(1 / rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        stop.set()
        await sampler
        after = await _metrics(client, url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after if k.endswith("_total") or "_total{" in k}
    return results, duration, rss, delta


def summarize(results: list[Timeline], duration: float, slos: dict[str, float]) -> dict:
    done = [t for t in results if t.ok]
    out_tokens = sum(len(t.token_times) for t in done)

    def stats(xs: list[float]) -> dict:
        if not xs:
            return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
        a = np.asarray(xs) * 1000
        return {"mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
                "p99_ms": float(np.percentile(a, 99))}

    def good(t: Timeline) -> bool:
        vals = {"ttft": t.ttft, "tpot": t.tpot or 0.0, "e2el": t.e2el}
        return all(vals[k] <= v for k, v in slos.items())

    return {
        "requests": len(results), "completed": len(done),
        "rejected_429": sum(1 for t in results if t.status == 429),
        "failed": sum(1 for t in results if not t.ok and t.status != 429),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(t.prompt_tokens for t in done)) / duration,
        "goodput": sum(1 for t in done if good(t)) / duration, "goodput_slos_ms": {k: v * 1000 for k, v in slos.items()},
        "ttft": stats([t.ttft for t in done]), "tpot": stats([t.tpot for t in done if t.tpot is not None]),
        "itl": stats([x for t in done for x in t.itls]), "e2el": stats([t.e2el for t in done]),
    }


async def run_prefix(url: str, model: str, conversations: int, history: int, vocab: int, headers: dict,
                     rng: np.random.Generator) -> dict:
    """Cold first turns and warm second turns over the same long history, one request at a time."""
    import httpx

    cold, warm = [], []
    async with httpx.AsyncClient(timeout=None) as client:
        before = await _metrics(client, url)
        for _ in range(conversations):
            hist = rng.integers(0, vocab, history).tolist()
            q1, q2 = rng.integers(0, vocab, 16).tolist(), rng.integers(0, vocab, 16).tolist()
            t1 = await _one(client, url, model, hist + q1, 16, headers)
            t2 = await _one(client, url, model, hist + q1 + t1.token_ids + q2, 16, headers)
            if not (t1.ok and t2.ok):
                raise LLMCError(f"a prefix-benchmark request failed: {t1.status} {t1.error} {t2.status} {t2.error}")
            cold.append(t1.ttft)
            warm.append(t2.ttft)
        after = await _metrics(client, url)
    key = "llmc_prefix_cache_hit_tokens_total"
    return {"conversations": conversations, "history_tokens": history,
            "ttft_cold_ms": {"mean": 1000 * float(np.mean(cold)), "p50": 1000 * float(np.median(cold))},
            "ttft_warm_ms": {"mean": 1000 * float(np.mean(warm)), "p50": 1000 * float(np.median(warm))},
            "speedup_p50": float(np.median(cold) / np.median(warm)),
            "prefix_cache_hit_tokens": after.get(key, 0) - before.get(key, 0)}


def _print(res: dict) -> None:
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k:28s} " + "  ".join(f"{kk}={vv:.2f}" if isinstance(vv, float) else f"{kk}={vv}"
                                           for kk, vv in v.items()))
        elif isinstance(v, float):
            print(f"{k:28s} {v:.3f}")
        else:
            print(f"{k:28s} {v}")


def main_bench_serve(a: argparse.Namespace) -> int:
    import httpx

    url = a.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise LLMCError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise LLMCError(f"{url}/v1/models answered {r.status_code}: {r.text[:200]}")
    card = r.json()["data"][0]
    model = a.model or card["id"]
    context, vocab = int(card["max_model_len"]), int(card.get("vocab_size", 1000))
    if a.num_prompts < 1:
        raise LLMCError("--num-prompts must be >= 1")
    rng = np.random.default_rng(a.seed)
    if a.dataset == "prefix":
        if a.history_tokens + 16 + 16 + 16 + 16 >= context:
            raise LLMCError(f"--history-tokens {a.history_tokens} leaves no room in the served context of {context}")
        res = asyncio.run(run_prefix(url, model, a.num_prompts, a.history_tokens, vocab, headers, rng))
    else:
        make = sharegpt_like if a.dataset == "sharegpt" else heavy_tail
        work = make(a.num_prompts, context, vocab, rng)
        results, duration, rss, delta = asyncio.run(
            run_load(url, model, work, a.request_rate, a.max_concurrency, headers, rng))
        res = summarize(results, duration, parse_goodput(a.goodput))
        res["dataset"], res["request_rate"], res["max_concurrency"] = a.dataset, a.request_rate, a.max_concurrency
        if rss:
            res["server_rss_mib"] = {"first": rss[0] / 2**20, "max": max(rss) / 2**20, "last": rss[-1] / 2**20}
        res["server_counters"] = {k.removeprefix("llmc_"): v for k, v in delta.items() if v}
    _print(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


__all__ = ["main_bench_serve", "summarize", "Timeline", "sharegpt_like", "heavy_tail", "parse_goodput"]
