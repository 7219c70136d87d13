"""Distillation on the CPU: does a distilled half-depth student beat the same student pruned
without training and trained on the plain next-token loss for the same time? And what does
half the depth buy at decode time once llmc compiles it?

    python benchmarks/distill_cpu.py [--minutes 8] [--threads 2] [--rounds 4] [--out DIR] [--decode-only]

Teacher: llmc's trained 4-layer Llama (tools/train_tiny_llama.py). Training text: the stdlib
source the teacher was trained on (written to DIR/train.txt); held-out: its heldout.txt.
Students keep 2 of the 4 layers, chosen by `llmc distill`'s loss-based layer importance:
(a) pruned, untrained (--steps 0); (b) --loss ce for --minutes of training; (c) --loss kd
(the recipe in RECIPE) for the same minutes. (b) and (c) take turns in --rounds rounds of
minutes/rounds each (each round a --resume of its run with a larger --time-limit), so load
from other users of the machine falls on both alike. The time limit counts training steps
only; the schedule anneals to it.

Perplexity: every model on the same consecutive 128-token windows of heldout.txt (at most
--eval-windows of them). Decode: the teacher and (c) compiled by llmc (CPU, fp32, generate
step function), batch 1, one prompt; a decode step is (time of generate(1 + N new tokens) -
time of generate(1 new token)) / N, median of --reps; three such medians per model, the two
models alternating, the lowest kept. `--decode-only --out DIR` times again the models an
earlier run left in DIR (decode times move several-fold with the load on a shared machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

# OpenMP threads that spin while they wait run several times slower when other processes
# share the cores (measured on the 2-core VM under load: a 2048 x 256 multiply 15 ms spinning,
# 0.3 ms passive); read when torch loads, so set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

import llmc  # noqa: E402
from llmc.distill import DistillConfig, distill  # noqa: E402
from llmc.distill.data import TokenData, read_text, tokenize  # noqa: E402
from llmc.distill.evaluate import perplexity  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from train_tiny_llama import stdlib_texts, trained_model  # noqa: E402

# shared by (b) and (c): batch, window, peak lr, warmup, schedule
COMMON = dict(seq_len=128, batch=16, lr=1e-3, warmup=20, eval_every=100, eval_windows=64, checkpoint_every=100,
              steps=100_000)  # the time limit ends both runs; the schedule anneals to it
RECIPE_KD = dict(loss="kd", temperature=1.0, kd_weight=1.0, hidden_weight=1.0, ce_weight=1.0)
PROMPT = "def __init__(self, name, value=None):\n    "


def quiet(msg: str) -> None:
    print(f"    {msg}", flush=True)


def run_pair(base: DistillConfig, keep, minutes: float, rounds: int, out: pathlib.Path) -> dict:
    runs = {"b": dataclasses.replace(base, output=str(out / "b_ce"), loss="ce", keep=keep),
            "c": dataclasses.replace(base, output=str(out / "c_kd"), keep=keep, **RECIPE_KD)}
    results = {}
    for r in range(1, rounds + 1):
        for name, cfg in runs.items():
            pause = minutes * 60 * r / rounds
            print(f"[{name}] round {r}/{rounds}: training to {pause:.0f}s", flush=True)
            results[name] = distill(dataclasses.replace(cfg, time_limit=minutes * 60, pause_at=pause, resume=r > 1),
                                    progress=quiet)
    return results


def decode_ms(cm, ids: list[int], new: int, reps: int) -> float:
    def run(n):
        t = time.perf_counter()
        cm.generate([ids], max_new_tokens=n, stop_token_ids=())
        return time.perf_counter() - t

    run(new + 1)
    return statistics.median((run(new + 1) - run(1)) / new for _ in range(reps)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="training time of (b) and of (c)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=400)
    p.add_argument("--new", type=int, default=128, help="decode steps timed")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="work folder (default: a temporary one)")
    p.add_argument("--teacher", help="teacher folder (default: the trained model; e.g. one trained longer with "
                                     "tools/train_tiny_llama.py --steps ... --out DIR); the students train on the "
                                     "text of its recipe.json")
    p.add_argument("--decode-only", action="store_true", help="only the decode timing, of the student (c) that an "
                                                              "earlier run left in --out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["LLMC_NUM_THREADS"] = str(a.threads)
    out = pathlib.Path(a.out or tempfile.mkdtemp(prefix="llmc-distill-"))
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = pathlib.Path(a.teacher) if a.teacher else trained_model()
    recipe = json.loads((teacher_dir / "recipe.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    load = lambda f: transformers.AutoModelForCausalLM.from_pretrained(f, local_files_only=True).eval()  # noqa: E731
    if a.decode_only:
        return decode(load(teacher_dir), load(out / "c_kd"), tok, a)
    train_file = out / "train.txt"
    train_file.write_text("\n".join(stdlib_texts(recipe["text_mb"])[0]), encoding="utf-8")
    heldout = teacher_dir / "heldout.txt"
    print(f"teacher: {teacher_dir.name} ({recipe['layers']} layers, {recipe['steps']} steps of {recipe['batch']} x "
          f"{recipe['seq']}); training text {train_file.stat().st_size / 1e6:.1f} MB; "
          f"{a.threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}); {a.minutes} min per trained "
          f"student; torch {torch.__version__}", flush=True)

    base = DistillConfig(teacher=str(teacher_dir), output="", data=str(train_file), heldout=str(heldout), **COMMON)
    t = time.perf_counter()
    pruned = distill(dataclasses.replace(base, output=str(out / "a_pruned"), layers=2, steps=0), progress=quiet)
    print(f"[a] kept layers {list(pruned.keep)} (loss-based importance), untrained, {time.perf_counter() - t:.0f}s")
    trained = run_pair(base, pruned.keep, a.minutes, a.rounds, out)

    held = tokenize(tok, read_text(str(heldout), "heldout"))
    windows = TokenData(held, held, 128).heldout_windows(a.eval_windows)
    models = {"teacher (4 layers)": load(teacher_dir), "(a) 2 layers, pruned, untrained": load(out / "a_pruned"),
              "(b) 2 layers, next-token loss": load(out / "b_ce"), "(c) 2 layers, distilled (KD + hidden MSE + CE)":
              load(out / "c_kd")}
    steps = {"(b)": trained["b"], "(c)": trained["c"]}
    print(f"\nheld-out perplexity ({len(windows)} windows of 128 tokens of heldout.txt):\n")
    print("| model | parameters | training | held-out perplexity |")
    print("|---|---|---|---|")
    ppl = {}
    for name, m in models.items():
        ppl[name] = perplexity(m, windows)
        r = steps.get(name[:3])
        how = f"{r.steps} steps in {r.train_seconds / 60:.1f} min" if r else "-"
        print(f"| {name} | {sum(x.numel() for x in m.parameters()) / 1e6:.2f}M | {how} | {ppl[name]:.2f} |",
              flush=True)
    names = list(ppl)
    best = min(names[1:], key=ppl.get)
    print(f"\nlowest student perplexity: {best}; distilled vs next-token: {ppl[names[3]]:.2f} vs {ppl[names[2]]:.2f}")

    decode(models[names[0]], models[names[3]], tok, a)


def decode(teacher, student, tok, a) -> None:
    ids = tok(PROMPT)["input_ids"]
    compiled = {}
    for name, m in (("teacher", teacher), ("student (c)", student)):
        t = time.perf_counter()
        compiled[name] = llmc.compile(m, (), {"input_ids": torch.tensor([ids])},
                                      dim_bounds={"batch": (1, 2), "seq": (1, 256)}, generate=True)
        got = compiled[name].generate([ids], max_new_tokens=16, stop_token_ids=())[0].token_ids
        ref = m.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        print(f"compiled {name} in {time.perf_counter() - t:.0f}s; greedy tokens "
              f"{'identical to' if got == ref else 'DIFFERENT from'} transformers'", flush=True)
    times = {n: [] for n in compiled}
    for _ in range(3):  # alternate: the machine's speed drifts
        for n, cm in compiled.items():
            times[n].append(decode_ms(cm, ids, a.new, a.reps))
    ms = {n: min(v) for n, v in times.items()}  # the least disturbed of the alternating medians
    t_ms, s_ms = ms["teacher"], ms["student (c)"]
    print(f"\ndecode step, batch 1 (llmc, CPU, {a.threads} threads, {a.new} steps): teacher {t_ms:.3f} ms, "
          f"student (c) {s_ms:.3f} ms per token; student / teacher {s_ms / t_ms:.2f}x")


if __name__ == "__main__":
    main()
