"""One benchmark run over N rank processes (llmc's launcher) whose rank 0 prints `RESULT {json}`:
the parsed result, or None after printing why the run failed. Shared by the multi-GPU benchmarks."""
from __future__ import annotations

import io
import json
import time


def launch_for_result(argv: list[str], ranks: int, tag: str, art: str, timeout: float) -> dict | None:
    from llmc.runtime.dist.launch import launch

    out, err = io.StringIO(), io.StringIO()
    t = time.perf_counter()
    res = launch(argv, ranks, stdout=out, stderr=err, timeout=timeout, label=False, check=False)
    line = next((ln for ln in out.getvalue().splitlines() if ln.startswith("RESULT ")), None)
    if not res.ok or line is None:
        print(f"[{tag}] {art}: failed\n{res.report()}\n{err.getvalue()[-3000:]}", flush=True)
        return None
    r = json.loads(line[len("RESULT "):])
    r["art"] = art
    print(f"[{tag}] {art}: {json.dumps(r)} ({time.perf_counter() - t:.0f} s)", flush=True)
    return r
