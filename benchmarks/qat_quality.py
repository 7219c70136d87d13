"""QAT against PTQ at the same fine-tuning budget, on llmc's trained small Llama (CPU).

    python benchmarks/qat_quality.py [--steps 150] [--group 64] [--windows 48] [--threads 2]

Both arms start from the trained model (tools/train_tiny_llama.py) and spend the same
budget: `--steps` AdamW steps on the same batches (`--batch` x `--seq` tokens drawn with one
seed from the training split of the stdlib source, as that script reads it), same
learning-rate schedule for the weights.
- PTQ arm: plain fp32 fine-tuning, then int4 `--group` RTN and GPTQ (calibration: the
  training split, as benchmarks/quant_quality.py does) at compile time.
- QAT arm: llmc.quant.prepare_qat(model, "int4", group) fine-tuned (weights and scales;
  scales in their own parameter group, `--scale-lr`), then llmc.quant.convert and
  `llmc.compile(..., quant=grid)`.
Every perplexity is of an llmc-compiled artifact, exported and loaded back with the
runtime (llmc.load), over `--windows` non-overlapping 256-token windows of heldout.txt;
PTQ of the model without fine-tuning is printed too. The QAT row also prints the torch
fake-quantized model's perplexity (the artifact must match it).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch
import transformers

import llmc
import llmc.quant

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from quant_quality import nll_per_token  # noqa: E402
from train_tiny_llama import stdlib_texts, trained_model  # noqa: E402

SEQ = 256


def finetune(model, ids: np.ndarray, args, scales=(), label: str = "") -> float:
    """`args.steps` AdamW steps on seeded random windows of `ids`; returns seconds."""
    scale_ids = {id(p) for p in scales}
    groups = [{"params": [p for p in model.parameters() if id(p) not in scale_ids], "lr": args.lr}]
    if scales:
        groups.append({"params": list(scales), "lr": args.scale_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, args.steps // 10)  # Adam's first steps are full-size in every coordinate: ramp up
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    rng = np.random.default_rng(1234)  # the same batches for both arms
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = rng.integers(0, ids.size - args.seq - 1, args.batch)
        x = torch.from_numpy(np.stack([ids[i:i + args.seq] for i in starts]))
        loss = model(input_ids=x, labels=x.clone(), use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"  [{label}] step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4, help="weights (both arms): 10%% warm-up, cosine to 0")
    p.add_argument("--scale-lr", type=float, default=2e-5, help="QAT scales")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = trained_model(log=lambda m: print(f"[train] {m}", flush=True))
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    held = np.asarray(tok((folder / "heldout.txt").read_text(encoding="utf-8"))["input_ids"], np.int64)
    windows = [held[i * SEQ:(i + 1) * SEQ] for i in range(min(args.windows, len(held) // SEQ))]
    train, _ = stdlib_texts(6)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    train_ids = np.concatenate([np.asarray(tok(t)["input_ids"] + [eos], np.int64) for t in train])
    print(f"held-out: {len(windows)} windows x {SEQ} tokens; fine-tuning: {args.steps} steps x {args.batch} x "
          f"{args.seq} tokens of {train_ids.size} training tokens; int4 g{args.group}; {args.threads} threads",
          flush=True)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        calib = out / "calib.txt"
        calib.write_text("\n".join(train[::7])[:400_000], encoding="utf-8")
        rows = []

        def measure(label, model, **kw):
            if kw.get("method") == "gptq":
                kw = dict(kw, calib=str(calib), calib_samples=args.calib_samples)
            t = time.perf_counter()
            cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3]])},
                              dim_bounds={"batch": (1, 1), "seq": (1, SEQ)}, generate=False,
                              tokenizer=str(folder / "tokenizer.json"), **kw)
            ppl = float(np.exp(nll_per_token(llmc.load(cm.export(out / f"a{len(rows)}")), windows)))
            rows.append((label, ppl))
            print(f"{label:34s} ppl {ppl:9.4f}  {100 * (ppl / rows[0][1] - 1):+7.2f}% vs fp32  "
                  f"(compile {time.perf_counter() - t:.0f}s)", flush=True)
            return ppl

        base = load()
        measure("fp32 (trained)", base)
        measure(f"PTQ int4 g{args.group} rtn", base, quant="int4", group=args.group)
        measure(f"PTQ int4 g{args.group} gptq", base, quant="int4", group=args.group, method="gptq")

        ft = load()
        ft_s = finetune(ft, train_ids, args, label="fp32 fine-tune")
        measure(f"fp32 fine-tuned ({args.steps} steps)", ft)
        ptq_rtn = measure(f"fp32 FT + PTQ int4 g{args.group} rtn", ft, quant="int4", group=args.group)
        ptq_gptq = measure(f"fp32 FT + PTQ int4 g{args.group} gptq", ft, quant="int4", group=args.group,
                           method="gptq")
        del ft

        qat = llmc.quant.prepare_qat(load(), "int4", group=args.group)
        qat_s = finetune(qat, train_ids, args, scales=list(llmc.quant.scale_parameters(qat)), label="QAT")

        def torch_run(input_ids):
            with torch.no_grad():
                return [qat(torch.from_numpy(input_ids)).logits.numpy()]

        fq_ppl = float(np.exp(nll_per_token(torch_run, windows)))
        plain, grid = llmc.quant.convert(qat)
        qat_ppl = measure(f"QAT int4 g{args.group} ({args.steps} steps)", plain, quant=grid)
        print(f"  torch fake-quantized QAT model ppl {fq_ppl:.4f} (artifact {qat_ppl:.4f}, "
              f"{100 * abs(qat_ppl / fq_ppl - 1):.4f}% apart); fine-tuning time fp32 {ft_s:.0f}s, QAT {qat_s:.0f}s")
        best = min(ptq_rtn, ptq_gptq)
        print(f"QAT vs the best PTQ after the same budget: {qat_ppl:.4f} vs {best:.4f} "
              f"({100 * (qat_ppl / best - 1):+.2f}%): QAT {'beats' if qat_ppl < best else 'does NOT beat'} PTQ",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
