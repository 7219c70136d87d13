"""`llmc bench-serve` against a real server: every request completes with its exact output
length, and the report's figures hang together (a smoke test: timings are not asserted)."""
from __future__ import annotations

import json

from serving import serving

from llmc.cli import main
from llmc.runtime.serve.engine import EngineConfig


def test_bench_serve_reports_vllm_measures(trained_artifact, tmp_path):
    with serving(trained_artifact, EngineConfig()) as running:
        base = f"http://127.0.0.1:{running.port}"
        out = tmp_path / "load.json"
        assert main(["bench-serve", "--base-url", base, "--num-prompts", "12", "--request-rate", "50",
                     "--dataset", "heavy-tail", "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert r["completed"] == r["requests"] == 12 and r["failed"] == r["rejected_429"] == 0
        tokens = r["output_token_throughput"] * r["duration_s"]
        assert abs(r["server_counters"]["generation_tokens_total"] - tokens) < 1e-6  # the server agrees
        for k in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < r[k]["p50_ms"] <= r[k]["p99_ms"]
        assert r["ttft"]["p50_ms"] <= r["e2el"]["p50_ms"]
        pre = tmp_path / "prefix.json"
        assert main(["bench-serve", "--base-url", base, "--num-prompts", "2", "--dataset", "prefix",
                     "--history-tokens", "150", "--json", str(pre)]) == 0
        p = json.loads(pre.read_text())
        assert p["prefix_cache_hit_tokens"] >= 2 * (150 // 16) * 16  # each second turn reused its history
