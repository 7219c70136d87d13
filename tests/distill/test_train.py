"""Training: the schedule, that distillation moves the student toward the teacher, and that an
interrupted run resumes from its checkpoint to exactly the weights of an uninterrupted run."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from llmc.distill import DistillConfig, distill
from llmc.distill.losses import kd_loss
from llmc.distill.train import lr_factor

QUICK = dict(seq_len=32, batch=4, eval_every=2, eval_windows=8, checkpoint_every=100, warmup=2, lr=3e-3)


def _config(teacher_dir, text_file, out, **kw) -> DistillConfig:
    return DistillConfig(teacher=str(teacher_dir), output=str(out), data=str(text_file), **{**QUICK, **kw})


def _weights(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_schedule_warms_up_then_decays_to_the_floor():
    c = DistillConfig(teacher="", output="", data="", warmup=4, min_lr_ratio=0.1)
    assert lr_factor(c, 0, 0.0) == pytest.approx(0.25)
    assert lr_factor(c, 3, 0.0) == pytest.approx(1.0)
    assert lr_factor(c, 50, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(c, 99, 1.0) == pytest.approx(0.1)
    lin = DistillConfig(teacher="", output="", data="", warmup=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_factor(lin, 10, 0.25) == pytest.approx(0.75)


def test_distillation_moves_the_student_toward_the_teacher(teacher, teacher_dir, text_file, tmp_path):
    keep = (0, 3)
    untrained = distill(_config(teacher_dir, text_file, tmp_path / "s0", keep=keep, steps=0), progress=lambda m: None)
    trained = distill(_config(teacher_dir, text_file, tmp_path / "s1", keep=keep, steps=12),
                      progress=lambda m: None)
    assert untrained.keep == trained.keep == keep and trained.steps == 12
    ids = torch.randint(1, teacher.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(9))

    def kd(folder):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        with torch.no_grad():
            return float(kd_loss(model(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0))

    assert kd(tmp_path / "s1") < 0.9 * kd(tmp_path / "s0")
    record = json.loads((tmp_path / "s1" / "distill.json").read_text())
    assert record["kept_layers"] == [0, 3] and record["step"] == 12
    assert [s for s, _ in record["heldout_perplexity"]] == list(range(2, 13, 2))  # every --eval-every steps


def test_bf16_teacher_still_distills_and_leaves_the_student_float32(teacher, teacher_dir, text_file, tmp_path):
    """--teacher-dtype bfloat16: the loop's teacher is a bf16 copy; the written student is float32
    and still moves toward the (float32) teacher."""
    keep = (0, 3)
    untrained = distill(_config(teacher_dir, text_file, tmp_path / "s0", keep=keep, steps=0), progress=lambda m: None)
    distill(_config(teacher_dir, text_file, tmp_path / "s1", keep=keep, steps=12, teacher_dtype="bfloat16"),
            progress=lambda m: None)
    assert untrained.keep == keep
    ids = torch.randint(1, teacher.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(5))
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s1", local_files_only=True).eval()
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())

    def kd(folder):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        with torch.no_grad():
            return float(kd_loss(model(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0))

    assert kd(tmp_path / "s1") < 0.9 * kd(tmp_path / "s0")


def test_interrupted_run_resumes_to_the_uninterrupted_result(teacher_dir, text_file, tmp_path):
    """Run 6 steps straight; then 6 steps interrupted (Ctrl-C) after step 3 and resumed. The
    resumed run starts at step 3 and ends with the same weights, bit for bit (same data
    order, optimizer moments and schedule), and the same held-out perplexities."""
    kw = dict(layers=2, steps=6, width_ratio=0.5)
    straight = distill(_config(teacher_dir, text_file, tmp_path / "a", **kw), progress=lambda m: None)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_config(teacher_dir, text_file, tmp_path / "b", **kw), progress=lambda m: None, on_step=interrupt)
    assert not (tmp_path / "b" / "model.safetensors").exists()  # the run did not finish
    resumed = distill(_config(teacher_dir, text_file, tmp_path / "b", resume=True, **kw), progress=lambda m: None)
    assert (resumed.start_step, resumed.steps) == (3, 6)
    assert resumed.keep == straight.keep
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.evals == straight.evals


def test_resume_continues_a_finished_run_to_more_steps(teacher_dir, text_file, tmp_path):
    out = tmp_path / "s"
    distill(_config(teacher_dir, text_file, out, keep=(1, 2), steps=2), progress=lambda m: None)
    more = distill(_config(teacher_dir, text_file, out, keep=(1, 2), steps=5, resume=True), progress=lambda m: None)
    assert (more.start_step, more.steps) == (2, 5)
    assert json.loads((out / "distill.json").read_text())["step"] == 5
