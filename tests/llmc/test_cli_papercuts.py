"""The `llmc` command's papercuts: sources it refuses clearly, --dim/--cpu, run's inputs,
outputs and device, replacing artifacts, broken pipes, --version and `python -m llmc`."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmc.cli import artifact_device, parse_dim
from llmc.errors import LLMCError

LLMC_SCRIPT = pathlib.Path(sys.executable).parent / "llmc"  # the console script (no cwd on sys.path)

GOOD_MODULE = """import torch

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval(), \\
        (torch.randn(1, 1, 4),)  # batch 1, seq 1: the dims stay symbolic
"""


def llmc(*args, cwd=None, script=False, timeout=600):
    cmd = [str(LLMC_SCRIPT)] if script else [sys.executable, "-m", "llmc"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")  # help lines unwrapped
    env.pop("PYTHONPATH", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("papercuts")
    (d / "goodmod.py").write_text(GOOD_MODULE)
    (d / "badmod.py").write_text("def make():\n    raise ValueError('boom in make')\n")
    return d


@pytest.fixture(scope="module")
def artifact(workdir):
    """A tiny MLP compiled by the console script from a module in the current folder,
    with a batch-1, seq-1 example."""
    r = llmc("compile", "goodmod:make", "-o", "mlp.llmc", "--batch", "4", "--seq-len", "8", cwd=workdir, script=True)
    assert r.returncode == 0, r.stderr
    return workdir / "mlp.llmc"


def reference(x: np.ndarray) -> np.ndarray:
    namespace: dict = {}
    exec(GOOD_MODULE, namespace)
    model, _ = namespace["make"]()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_version_and_python_m():
    r = llmc("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("llmc ")
    r = llmc("compile", "--help")
    assert r.returncode == 0
    for text in ("(default: 512)", "(default: 8)", "(default: llvm)", "--dim NAME=LO:HI", "--cpu NAME", "--force"):
        assert text in r.stdout, text


def test_module_in_current_folder_with_batch_one_example(artifact, workdir):
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)  # not the example's shape
    np.savez(workdir / "inputs.npz", input=x)
    r = llmc("run", str(artifact), "--input", str(workdir / "inputs.npz"), "-o", str(workdir / "out.npz"))
    assert r.returncode == 0, r.stderr
    got = np.load(workdir / "out.npz")["output"]
    assert got.shape == (3, 5, 4) and np.abs(got - reference(x)).max() <= 1e-5


def test_run_checks_the_output_path_before_running(artifact, workdir):
    np.save(workdir / "x.npy", np.zeros((1, 2, 4), np.float32))
    r = llmc("run", str(artifact), "--input", str(workdir / "x.npy"), "-o", str(workdir / "no-such-dir" / "o.npz"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert "ran in" not in r.stderr  # refused before the model ran


def test_run_uses_the_artifact_device(artifact, tmp_path):
    assert artifact_device(str(artifact)) == "cpu"
    (tmp_path / "manifest.json").write_text('{"target": {"device": "cuda"}}')
    assert artifact_device(str(tmp_path)) == "cuda"
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "manifest.json")  # never opened: a FIFO would block the read
    assert artifact_device(str(fifo)) == "cpu"
    (tmp_path / "manifest.json").write_text("[1, 2")
    assert artifact_device(str(tmp_path)) == "cpu"  # the loader then names the problem


def test_existing_artifact_needs_force(artifact, workdir):
    before = (artifact / "manifest.json").stat().st_mtime_ns
    r = llmc("compile", "goodmod:make", "-o", str(artifact), cwd=workdir)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (artifact / "manifest.json").stat().st_mtime_ns == before
    (workdir / "notes").mkdir(exist_ok=True)
    (workdir / "notes" / "todo.txt").write_text("mine")
    r = llmc("compile", "goodmod:make", "-o", "notes", "--force", cwd=workdir)
    assert r.returncode == 2 and "not an llmc artifact" in r.stderr
    assert (workdir / "notes" / "todo.txt").read_text() == "mine"


def test_force_replaces_and_says_so(workdir):
    out = workdir / "again.llmc"
    assert llmc("compile", "goodmod:make", "-o", str(out), cwd=workdir).returncode == 0
    r = llmc("compile", "goodmod:make", "-o", str(out), "--force", cwd=workdir)
    assert r.returncode == 0 and "replacing the artifact" in r.stderr


def test_inspect_into_a_closed_pipe(artifact):
    p = subprocess.Popen([sys.executable, "-m", "llmc", "inspect", str(artifact)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # like `| head` exiting before llmc writes
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    p.stderr.close()
    assert "BrokenPipeError" not in err and "Traceback" not in err
    assert p.returncode in (0, 141)


def test_raising_module_function_is_a_clean_error(workdir):
    r = llmc("compile", "badmod:make", "-o", "x.llmc", cwd=workdir, script=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "ValueError: boom in make" in r.stderr and "badmod.py:2" in r.stderr
    r = llmc("compile", "nosuchmod:make", "-o", "x.llmc", cwd=workdir)
    assert r.returncode == 2 and "cannot import 'nosuchmod:make'" in r.stderr


def test_broken_config_json_is_a_clean_error(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"architectures": [')
    r = llmc("compile", str(tmp_path / "model"), "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "config.json: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "model" / "config.json").write_text('{"model_type": "no-such-family"}')
    r = llmc("compile", str(tmp_path / "model"), "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "cannot load the Hugging Face model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("src", ["gpt2", "llama", "bert", "meta-llama/Llama-3.2-1B"])
def test_hub_ids_and_bare_family_names_are_refused(src, tmp_path):
    r = llmc("compile", src, "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "llmc never downloads" in r.stderr
    assert f"huggingface-cli download {src}" in r.stderr
    if "/" not in src:
        assert f"tiny-{src}" in r.stderr  # the bundled toy is named, not taken
    assert not (tmp_path / "x").exists()


def test_dim_and_cpu_flags(workdir):
    assert parse_dim("s=1:256") == ("s", (1, 256))
    for bad in ("seq=1", "seq=4:2", "seq=0:3", "=1:2", "seq=a:b"):
        with pytest.raises(LLMCError, match="NAME=LO:HI"):
            parse_dim(bad)
    r = llmc("compile", "goodmod:make", "-o", "x.llmc", "--dim", "heads=1:4", cwd=workdir)
    assert r.returncode == 2 and "only the dims batch and seq" in r.stderr
    r = llmc("compile", "goodmod:make", "-o", "x.llmc", "--cpu", "native", "--target", "cuda", cwd=workdir)
    assert r.returncode == 2 and "--cpu native only applies to CPU targets" in r.stderr


def test_dim_bounds_reach_the_artifact(workdir):
    r = llmc("compile", "goodmod:make", "-o", "dims.llmc", "--dim", "seq=1:6", "--dim", "batch=1:3", cwd=workdir)
    assert r.returncode == 0, r.stderr
    r = llmc("inspect", "dims.llmc", cwd=workdir)
    assert "batch in [1, 3]" in r.stdout and "seq in [1, 6]" in r.stdout, r.stdout
