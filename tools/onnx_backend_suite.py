"""Run ONNX's own backend test models (shipped in the `onnx` wheel) through llmc on the CPU.

    python tools/onnx_backend_suite.py [-j 2] [--timeout 120] [--only SUBSTR ...] [--out docs/onnx_backend_tests.md]

For each model under onnx/backend/test/data/{node,simple,pytorch-converted,pytorch-operator,light}
the model is compiled with `llmc.compile(path)` for `llvm`, run on each of its test data
sets and compared with the expected outputs:

- float32 / float16 / float64 outputs: `np.allclose(got, want, rtol=1e-3, atol=1e-5)` (fp16: rtol 1e-2,
  atol 1e-3), NaNs must match;
- integer and bool outputs: exact.

`light/` models ship no inputs, only the expected output of ONNX's reference runner on
its deterministic dummy input (`Runner.generate_dummy_data(..., random=False)`), which is
what is fed here. `real/` models are download-only and listed as not shipped.

Each model is classified as
- pass: every data set matches;
- unsupported: compiling raised an `llmc.LLMCError` (the message names the op or cause);
- bug: anything else: a wrong output, an `LLMCError` while running a model that compiled
  (it does not accept its own test inputs), a raw Python exception, a crash (signal) or a
  hang (per-model timeout).

Models run in worker subprocesses (-j of them, each checking models one after another so
TVM starts once per worker); a crash kills only its worker, a model that passes `--timeout`
is killed with it, and the next model gets a fresh worker. The markdown table with the
counts and the bug list goes to `--out`.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import glob
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

KINDS = ("node", "simple", "pytorch-converted", "pytorch-operator", "light", "real")
TOL = {"float32": (1e-3, 1e-5), "float64": (1e-3, 1e-5), "float16": (1e-2, 1e-3)}


def data_root() -> str:
    import onnx

    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")


def discover(root: str) -> list[tuple[str, str]]:
    """(case id "kind/name", model path or "" when the model is not shipped), sorted."""
    cases = []
    for kind in KINDS:
        base = os.path.join(root, kind)
        if not os.path.isdir(base):
            continue
        if kind == "light":
            for p in sorted(glob.glob(os.path.join(base, "light_*.onnx"))):
                cases.append((f"light/{os.path.basename(p)[:-5]}", p))
            continue
        for d in sorted(os.listdir(base)):
            p = os.path.join(base, d, "model.onnx")
            cases.append((f"{kind}/{d}", p if os.path.isfile(p) else ""))
    return cases


# ---- one model (runs in the worker subprocess) ---------------------------------------------
def _read_tensor(path: str):
    import onnx
    from onnx import numpy_helper

    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def _data_sets(model_path: str, model) -> list[tuple[list, list]]:
    if os.path.basename(model_path).startswith("light_"):
        from onnx.backend.test.runner import Runner

        inits = {t.name for t in model.graph.initializer}
        feeds = [Runner.generate_dummy_data(x, seed=0, name="", random=False)
                 for x in model.graph.input if x.name not in inits]
        outs = [_read_tensor(model_path[:-5] + f"_output_{i}.pb") for i in range(len(model.graph.output))]
        return [(feeds, outs)]
    sets = []
    for d in sorted(glob.glob(os.path.join(os.path.dirname(model_path), "test_data_set_*"))):
        n_in = len(glob.glob(os.path.join(d, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(d, "output_*.pb")))
        sets.append(([_read_tensor(os.path.join(d, f"input_{i}.pb")) for i in range(n_in)],
                     [_read_tensor(os.path.join(d, f"output_{i}.pb")) for i in range(n_out)]))
    return sets


def compare(got: np.ndarray, want: np.ndarray) -> str | None:
    """None when `got` matches `want` under the stated tolerances, else why not."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != expected {list(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != expected {want.dtype}"
    if want.dtype.kind == "f":
        rtol, atol = TOL.get(want.dtype.name, (1e-3, 1e-5))
        if np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            return None
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        return f"max abs error {np.nanmax(err) if err.size else 0:.3g} (rtol {rtol}, atol {atol})"
    if np.array_equal(got, want):
        return None
    return f"{int(np.sum(got != want))} of {want.size} elements differ"


def run_one(model_path: str) -> dict:
    """Compile and check one model; the result dict is what the worker prints as JSON."""
    import onnx

    import llmc
    from llmc.errors import LLMCError

    t0 = time.perf_counter()
    try:
        cm = llmc.compile(model_path)
    except LLMCError as e:
        return {"status": "unsupported", "detail": f"{type(e).__name__}: {e}", "s": time.perf_counter() - t0}
    except Exception as e:  # the point of the suite: a raw exception is a bug to report
        return {"status": "bug", "kind": "compile exception", "detail": _exc(e), "s": time.perf_counter() - t0}
    model = onnx.load(model_path)
    sets = _data_sets(model_path, model)
    if not sets:
        return {"status": "bug", "kind": "no data", "detail": "no test data sets", "s": time.perf_counter() - t0}
    for k, (inputs, wants) in enumerate(sets):
        try:
            gots = cm(*inputs)
        except LLMCError as e:
            return {"status": "bug", "kind": "run-time LLMCError", "detail": f"data set {k}: {type(e).__name__}: {e}",
                    "s": time.perf_counter() - t0}
        except Exception as e:
            return {"status": "bug", "kind": "run exception", "detail": f"data set {k}: {_exc(e)}",
                    "s": time.perf_counter() - t0}
        if len(gots) != len(wants):
            return {"status": "bug", "kind": "wrong output", "s": time.perf_counter() - t0,
                    "detail": f"data set {k}: {len(gots)} outputs, expected {len(wants)}"}
        for i, (g, w) in enumerate(zip(gots, wants)):
            why = compare(g, w)
            if why:
                return {"status": "bug", "kind": "wrong output", "detail": f"data set {k} output {i}: {why}",
                        "s": time.perf_counter() - t0}
    return {"status": "pass", "detail": f"{len(sets)} data set(s)", "s": time.perf_counter() - t0}


def _exc(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {str(e)[:300]}{where}"


# ---- the driver ---------------------------------------------------------------------------
class Worker:
    """A subprocess that checks models one after another (TVM's start-up cost is paid once);
    a crash or a timeout kills it and the next model gets a fresh one."""

    def __init__(self):
        self.p = None

    def _start(self) -> None:
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.p.stdout, self.lines), daemon=True).start()

    @staticmethod
    def _read(stream, q: queue.Queue) -> None:
        for line in stream:
            q.put(line)
        q.put(None)  # EOF: the worker died

    def stop(self) -> None:
        if self.p is not None:
            self.p.kill()
            self.p.wait()
            self.p = None

    def _stderr_tail(self) -> str:
        self.err.seek(0)
        lines = self.err.read().decode("utf-8", "replace").strip().splitlines()
        return (lines or ["(no output)"])[-1][:300]

    def check(self, path: str, timeout: float) -> dict:
        if self.p is None:
            self._start()
        self.p.stdin.write(path + "\n")
        self.p.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.stop()
                return {"status": "bug", "kind": "hang", "detail": f"no result within {timeout:g} s"}
            if line is None:
                self.p.wait()
                r = {"status": "bug", "kind": "crash",
                     "detail": f"worker exited with {self.p.returncode}: {self._stderr_tail()}"}
                self.p = None
                return r
            if line.startswith("@@RESULT "):
                return json.loads(line[len("@@RESULT "):])


_workers = threading.local()  # one Worker per driver thread
_all_workers: list[Worker] = []


def run_case(case: tuple[str, str], timeout: float) -> dict:
    cid, path = case
    if not path:
        return {"case": cid, "status": "not shipped", "detail": "download-only model (no model.onnx in the wheel)", "s": 0}
    if not hasattr(_workers, "w"):
        _workers.w = Worker()
        _all_workers.append(_workers.w)
    t0 = time.perf_counter()
    r = _workers.w.check(path, timeout)
    r.setdefault("s", time.perf_counter() - t0)
    return {"case": cid, **r}


def serve() -> None:
    """Worker loop: model paths on stdin, one result line each on the original stdout (the
    compile's own prints go to stderr so they cannot corrupt the protocol)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        out.write("@@RESULT " + json.dumps(run_one(line.strip())) + "\n")


def write_markdown(results: list[dict], path: str, argv: str, wall_s: float) -> None:
    counts = collections.Counter(r["status"] for r in results)
    by_kind = collections.defaultdict(collections.Counter)
    for r in results:
        by_kind[r["case"].split("/")[0]][r["status"]] += 1
    cols = ["pass", "unsupported", "bug", "not shipped"]
    lines = ["# ONNX backend test models through llmc (CPU)", "",
             "Generated by `tools/onnx_backend_suite.py` (see its docstring for the tolerances and classes):",
             f"`{argv}`, {wall_s:.0f} s wall. Every model is compiled with `llmc.compile(path)` for `llvm` and run on",
             "its shipped test data sets.", "",
             "| set | " + " | ".join(cols) + " | total |", "|---|" + "---:|" * (len(cols) + 1)]
    for kind in sorted(by_kind):
        c = by_kind[kind]
        lines.append(f"| {kind} | " + " | ".join(str(c[k]) for k in cols) + f" | {sum(c.values())} |")
    lines.append("| **all** | " + " | ".join(f"**{counts[k]}**" for k in cols) + f" | **{len(results)}** |")
    bugs = [r for r in results if r["status"] == "bug"]
    lines += ["", f"## Bugs ({len(bugs)})", ""]
    lines += [f"- `{r['case']}`: {r.get('kind', '')}: {_md(r['detail'])}" for r in bugs] or ["None."]
    unsup = [r for r in results if r["status"] == "unsupported"]
    lines += ["", f"## Clear errors ({len(unsup)})", ""]
    lines += [f"- `{r['case']}`: {_md(r['detail'])}" for r in unsup] or ["None."]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")[:400]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model (compile + run)")
    ap.add_argument("--only", nargs="*", default=None, help="case ids containing any of these substrings")
    ap.add_argument("--out", default="docs/onnx_backend_tests.md")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        serve()
        return 0
    cases = discover(data_root())
    if a.only:
        cases = [c for c in cases if any(s in c[0] for s in a.only)]
    t0, results = time.perf_counter(), []
    pool = cf.ThreadPoolExecutor(max(1, a.jobs))
    try:
        futs = {pool.submit(run_case, c, a.timeout): c for c in cases}
        for k, fut in enumerate(cf.as_completed(futs), 1):
            r = fut.result()
            results.append(r)
            print(f"[{k}/{len(cases)}] {r['status']:<11} {r['s']:6.1f}s {r['case']}: "
                  f"{r.get('kind', '')} {r['detail'][:160]}", flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for w in _all_workers:
            w.stop()
    results.sort(key=lambda r: r["case"])
    wall = time.perf_counter() - t0
    cmd = f"python tools/onnx_backend_suite.py -j {a.jobs} --timeout {a.timeout:g}"  # no local paths in the doc
    cmd += (" --only " + " ".join(a.only)) if a.only else ""
    write_markdown(results, a.out, cmd, wall)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    counts = collections.Counter(r["status"] for r in results)
    print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), f"({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
