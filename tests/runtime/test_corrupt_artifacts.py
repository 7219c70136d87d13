"""Over a hundred corrupted artifacts (tests/runtime/corrupt_cases.py): truncated and
bit-flipped files, lying manifests of every kind, path traversal, special files. Each must
be an ArtifactError at load or at the first call: never a crash, hang, raw exception or
wrong output.

The cases run in a worker process (many per process, to stay fast) that reports each
result as a JSON line; a case that crashes or hangs the worker is recorded as such and the
worker restarts after it, so one bad case fails its own test instead of killing pytest.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from corrupt_cases import CASES  # noqa: E402  (tests/runtime is on sys.path: rootdir-relative imports)

CASE_TIMEOUT_S = 20.0  # one case; the first includes the worker's start (imports, TVM)

WORKER = textwrap.dedent("""
    import json, sys, traceback
    import numpy as np
    import llmc
    from llmc.errors import ArtifactError, LLMCError

    x = np.load(sys.argv[1])
    want = np.load(sys.argv[2])
    for line in sys.stdin:
        i, folder = json.loads(line)
        print(json.dumps({"start": i}), flush=True)
        stage = "load"
        try:
            r = llmc.load(folder)
            stage = "call"
            outs = r(x)
            ok = len(outs) == len(want.files) and all(
                np.array_equal(o, want[f"arr_{k}"]) for k, o in enumerate(outs))
            res = {"kind": "loaded, correct output" if ok else "WRONG OUTPUT"}
        except ArtifactError as e:
            res = {"kind": "ArtifactError", "stage": stage, "msg": str(e)}
        except LLMCError as e:
            res = {"kind": "other " + type(e).__name__, "stage": stage, "msg": str(e)}
        except BaseException as e:  # the point of the harness: report, never hide
            res = {"kind": "RAW " + type(e).__name__, "stage": stage, "msg": traceback.format_exc()[-2000:]}
        res["end"] = i
        print(json.dumps(res), flush=True)
""")


def _run_all(folders: list[str], x_file: str, want_file: str) -> dict[int, dict]:
    results: dict[int, dict] = {}
    pending = list(range(len(folders)))
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    while pending:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, x_file, want_file], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
        for i in pending:
            proc.stdin.write(json.dumps([i, folders[i]]) + "\n")
        proc.stdin.close()
        current = None
        deadline = time.monotonic() + CASE_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()
                results[current if current is not None else pending[0]] = {"kind": "HANG"}
                break
            if line is None:  # the worker exited
                proc.wait()
                if current is not None and current not in results:
                    results[current] = {"kind": f"CRASH (exit {proc.returncode})"}
                elif current is None and pending and pending[0] not in results:
                    results[pending[0]] = {"kind": f"CRASH at start (exit {proc.returncode})"}
                break
            msg = json.loads(line)
            if "start" in msg:
                current = msg["start"]
                deadline = time.monotonic() + CASE_TIMEOUT_S
            else:
                results[msg["end"]] = msg
                current = None
        proc.wait()
        pending = [i for i in pending if i not in results]
    return results


@pytest.fixture(scope="module")
def outcomes(mlp_artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    pristine = root / "pristine"
    shutil.copytree(mlp_artifact[2], pristine)
    x = np.random.default_rng(7).standard_normal((2, 5, 16)).astype(np.float32)
    import llmc

    np.save(root / "x.npy", x)
    np.savez(root / "want.npz", *llmc.load(pristine)(x))
    names = ["(control) the pristine artifact", *CASES]
    folders = []
    for i, name in enumerate(names):
        d = root / f"case-{i:03d}"
        shutil.copytree(pristine, d)
        if i:
            CASES[name](d)
        folders.append(str(d))
    t = time.perf_counter()
    res = _run_all(folders, str(root / "x.npy"), str(root / "want.npz"))
    elapsed = time.perf_counter() - t
    tally: dict[str, int] = {}
    for i in range(1, len(names)):
        tally[res[i]["kind"]] = tally.get(res[i]["kind"], 0) + 1
    print(f"\ncorrupted artifacts: {len(names) - 1} cases in {elapsed:.1f}s: {tally}")
    return dict(zip(names, (res[i] for i in range(len(names)))))


def test_at_least_100_cases():
    assert len(CASES) >= 100


def test_control_loads_and_is_correct(outcomes):
    assert outcomes["(control) the pristine artifact"]["kind"] == "loaded, correct output"


@pytest.mark.parametrize("name", list(CASES))
def test_case_is_an_artifact_error(outcomes, name):
    res = outcomes[name]
    assert res["kind"] == "ArtifactError", f"{name}: {res}"
    assert len(res["msg"]) < 2000 and "Traceback" not in res["msg"]
