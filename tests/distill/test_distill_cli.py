"""`llmc distill` end to end through the command line: the student folder it writes is
compiled by `llmc compile`, and `llmc generate` on it gives transformers' greedy tokens on
the same student. Also: the package stays out of the compiler and runtime."""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers

REPO = pathlib.Path(__file__).resolve().parents[2]


def llmc(*args, timeout=300):
    # passive OpenMP waits: spinning threads crawl when the 2-core test machine is shared
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    return subprocess.run([sys.executable, "-m", "llmc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_distill_compile_generate(teacher_dir, text_file, tmp_path):
    student = tmp_path / "student"
    r = llmc("distill", teacher_dir, "-o", student, "--data", text_file, "--layers", "2", "--width-ratio", "0.5",
             "--steps", "4", "--seq-len", "32", "--batch", "2", "--eval-every", "2", "--lr", "3e-3")
    assert r.returncode == 0, r.stderr
    assert "layer importance (loss)" in r.stderr and "step 4: held-out perplexity" in r.stderr, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "distill.json"} <= {p.name for p in student.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(student, local_files_only=True).eval()
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 32
    assert model.config.num_key_value_heads == 1

    art = tmp_path / "student.llmc"
    r = llmc("compile", student, "-o", art, "--seq-len", "64", "--batch", "2")
    assert r.returncode == 0, r.stderr
    prompt = [5, 17, 33, 2, 90, 41]
    r = llmc("generate", art, "--ids", ",".join(map(str, prompt)), "--max-new-tokens", "8", "--stop-ids", "")
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    tok = transformers.AutoTokenizer.from_pretrained(student, local_files_only=True)
    assert r.stdout.rstrip("\n") == tok.decode(want).rstrip("\n")  # the artifact carries the tokenizer: text out


def cli(capsys, *args) -> tuple[int, str]:
    """`llmc ARGS` in this process (the same main() as the command): (exit status, stderr)."""
    from llmc.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_resume_continues_the_step_count(teacher_dir, text_file, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["distill", teacher_dir, "-o", out, "--data", text_file, "--keep", "0,3", "--seq-len", "16", "--batch",
            "2", "--eval-every", "1"]
    code, err = cli(capsys, *base, "--steps", "2")
    assert code == 0, err
    code, err = cli(capsys, *base, "--steps", "3")
    assert code == 2 and "pass --resume" in err, err
    code, err = cli(capsys, *base, "--steps", "3", "--resume")
    assert code == 0, err
    assert "resuming at step 2 of 3" in err and "step 3: held-out perplexity" in err, err
    code, err = cli(capsys, *base, "--resume", "--lr", "0.5")
    assert code == 2 and "--lr 0.5 differs from the checkpoint's" in err, err


def test_cli_help_lists_the_options(capsys):
    from llmc.cli import main

    with pytest.raises(SystemExit) as e:
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--keep I,J,...", "--width-ratio", "--time-limit SECONDS", "--resume", "last 10% of --data"):
        assert flag in out, out


def test_cli_errors(bert_dir, teacher_dir, text_file, tmp_path, capsys):
    code, err = cli(capsys, "distill", bert_dir, "-o", tmp_path / "o", "--data", text_file)
    assert code == 2 and "not a causal LM" in err, err
    code, err = cli(capsys, "distill", teacher_dir, "-o", tmp_path / "o", "--data", tmp_path / "missing.txt")
    assert code == 2 and "missing.txt: no such file" in err, err
    code, err = cli(capsys, "distill", teacher_dir, "-o", tmp_path / "o", "--data", text_file, "--layers", "9")
    assert code == 2 and "only 4 layers" in err, err
    for bad, match in ((["--keep", "0,x"], "comma-separated layer indices"),
                       (["--layers", "2", "--keep", "0,1"], "not allowed with argument")):
        with pytest.raises(SystemExit) as e:  # argparse's own usage errors
            cli(capsys, "distill", teacher_dir, "-o", tmp_path / "o", "--data", text_file, *bad)
        assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_cli_loads_no_torch_until_distill_runs():
    code = "import sys, llmc.cli; llmc.cli.build_parser(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_compiler_and_runtime_never_import_distill():
    for folder in ("compiler", "passes", "backends", "runtime"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [a.name for a in node.names]
                assert not any("distill" in n for n in names), f"{path} imports the distill package"
