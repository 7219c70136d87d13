"""Bad input gives an LLMCError naming the cause, before the teacher is loaded or a step is
trained (each case fails in well under a second and writes nothing)."""
from __future__ import annotations

import time

import pytest

import llmc
from llmc.distill import DistillConfig, distill


def _run(teacher, data, out, **kw):
    kw = {"seq_len": 16, "batch": 2, "steps": 2, **kw}
    return distill(DistillConfig(teacher=str(teacher), output=str(out), data=str(data), **kw), progress=lambda m: None)


@pytest.mark.parametrize("kw, match", [
    ({"layers": 5}, "--layers 5: the teacher has only 4 layers"),
    ({"keep": (0, 4)}, "layer 4 does not exist"),
    ({"keep": (1, 1)}, "layer 1 is named twice"),
    ({"keep": (-1, 2)}, "start at 0"),
    ({"keep": (2, 0)}, "increasing order"),
    ({"keep": ()}, "at least one layer"),
    ({"layers": 2, "keep": (0, 1)}, "not both"),
    ({"layers": 0}, "--layers 0: must be > 0"),
    ({"width_ratio": 0.0}, "--width-ratio 0.0"),
    ({"width_ratio": 1.5}, "--width-ratio 1.5"),
    ({"loss": "mse"}, "--loss 'mse'"),
    ({"steps": -1}, "--steps -1"),
    ({"lr": float("nan")}, "finite"),
    ({"teacher_dtype": "float16"}, "--teacher-dtype 'float16'"),
])
def test_bad_options(teacher_dir, text_file, tmp_path, kw, match):
    with pytest.raises(llmc.LLMCError, match=match):
        _run(teacher_dir, text_file, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_missing_and_empty_data(teacher_dir, tmp_path):
    with pytest.raises(llmc.LLMCError, match="no such file"):
        _run(teacher_dir, tmp_path / "nope.txt", tmp_path / "out")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(llmc.LLMCError, match="empty"):
        _run(teacher_dir, tmp_path / "empty.txt", tmp_path / "out")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(llmc.LLMCError, match="not UTF-8"):
        _run(teacher_dir, tmp_path / "bin.txt", tmp_path / "out")
    (tmp_path / "short.txt").write_text("x = 1\n")
    with pytest.raises(llmc.LLMCError, match="fewer than one window"):
        _run(teacher_dir, tmp_path / "short.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_causal_teacher(bert_dir, text_file, tmp_path):
    t = time.perf_counter()
    with pytest.raises(llmc.LLMCError, match=r"not a causal LM \(architectures \['BertModel'\]\)"):
        _run(bert_dir, text_file, tmp_path / "out")
    assert time.perf_counter() - t < 1.0  # from config.json alone: nothing was loaded


def test_teacher_folder_problems(text_file, tmp_path):
    with pytest.raises(llmc.LLMCError, match="no such folder"):
        _run(tmp_path / "missing", text_file, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(llmc.LLMCError, match="no config.json"):
        _run(tmp_path / "empty", text_file, tmp_path / "out")


def test_teacher_without_tokenizer(teacher_dir, text_file, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(teacher_dir / name, bare / name)
    with pytest.raises(llmc.LLMCError, match="no tokenizer files"):
        _run(bare, text_file, tmp_path / "out")


def test_output_folder_that_holds_something_else(teacher_dir, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(llmc.LLMCError, match="holds other files"):
        _run(teacher_dir, text_file, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(llmc.LLMCError, match="holds other files"):  # the teacher's own folder, say
        _run(teacher_dir, text_file, teacher_dir)
    (tmp_path / "file").write_text("x")
    with pytest.raises(llmc.LLMCError, match="not a folder"):
        _run(teacher_dir, text_file, tmp_path / "file")


def test_resume_rules(teacher_dir, text_file, tmp_path):
    with pytest.raises(llmc.LLMCError, match="no checkpoint"):
        _run(teacher_dir, text_file, tmp_path / "fresh", resume=True)
    out = tmp_path / "run"
    _run(teacher_dir, text_file, out, keep=(0, 1))
    with pytest.raises(llmc.LLMCError, match="pass --resume"):  # a finished run is not overwritten
        _run(teacher_dir, text_file, out, keep=(0, 1))
    with pytest.raises(llmc.LLMCError, match="--keep .* differs from the checkpoint"):
        _run(teacher_dir, text_file, out, keep=(0, 2), resume=True)
