"""CPU text generation: llmc's step function + paged KV cache against transformers' generate.

    python benchmarks/bench_generate.py [--new 128] [--threads 2] [--reps 3] [--model FOLDER]
    python benchmarks/bench_generate.py --kv      # llmc alone: float vs int8 vs fp8 KV cache

Model: llmc's trained small Llama (tools/train_tiny_llama.py; about 4M parameters, real
weights and tokenizer), fp32. Workloads, both greedy with no early stop:
- batch 1: one prompt, `--new` new tokens;
- batch 4: four prompts of different lengths in one call. transformers needs them left
  padded into one tensor (with an attention mask); llmc takes them ragged.
Each contender is timed over the whole generate call (prompt, every decode step, host
overhead included), median of `--reps` after a warm-up, alternating contenders; tokens/s
counts new tokens. The ratio is llmc / transformers in the same run. Greedy tokens are
checked identical at batch 1 (at batch 4 transformers' padded batch may differ in the
last bits, so only lengths are compared).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
import transformers

import llmc
import llmc.generation

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from train_tiny_llama import trained_model  # noqa: E402

PROMPTS = ["def __init__(self, ", "import os\nimport sys\n\n\ndef main(argv=None):\n    ",
           "class Queue:\n    \"\"\"A FIFO queue.\"\"\"\n\n    def put(self, item", "    return "]


def _time(fn, reps: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", help="a causal LM folder (default: the trained small Llama)")
    p.add_argument("--kv", action="store_true", help="only: llmc's generate with a float, int8 and fp8 KV cache "
                   "(--kv-cache-dtype), prompts of 768 tokens, same run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import os

    os.environ["LLMC_NUM_THREADS"] = str(a.threads)
    folder = pathlib.Path(a.model) if a.model else trained_model()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if a.kv:
        return kv_speed(model, folder, a)
    t = time.perf_counter()
    cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3, 4]])},
                      dim_bounds={"batch": (1, 8), "seq": (1, model.config.max_position_embeddings)},
                      generate=True, tokenizer=str(folder / "tokenizer.json"))
    print(f"compiled in {time.perf_counter() - t:.1f}s; {sum(x.numel() for x in model.parameters()) / 1e6:.1f}M "
          f"parameters; {a.threads} threads; {a.new} new tokens; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    rows = []
    for batch in (1, 4):
        prompts = PROMPTS[:batch]
        ids = [tok(p)["input_ids"] for p in prompts]
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)

        def hf():
            with torch.no_grad():
                return model.generate(**enc, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                                      pad_token_id=tok.pad_token_id)

        def ours():
            return cm.generate(ids, max_new_tokens=a.new, stop_token_ids=())

        t_hf, ref = _time(hf, a.reps)
        t_us, got = _time(ours, a.reps)
        t_hf2, _ = _time(hf, a.reps)  # again after llmc: the VM's speed drifts
        t_hf = min(t_hf, t_hf2)
        n = batch * a.new
        same = ""
        if batch == 1:
            ref_new = ref[0, enc["input_ids"].shape[1]:].tolist()
            hf_plain = model.generate(torch.tensor([ids[0]]), max_new_tokens=a.new, do_sample=False,
                                      eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(ids[0]):].tolist()
            same = "identical" if got[0].token_ids == hf_plain else "DIFFERENT"
            del ref_new
        rows.append((batch, n / t_hf, n / t_us, (n / t_us) / (n / t_hf), same))
    print(f"\n| batch | transformers generate tok/s | llmc generate tok/s | llmc / transformers | greedy tokens |")
    print("|---|---|---|---|---|")
    for b, hf_r, us_r, ratio, same in rows:
        print(f"| {b} | {hf_r:.0f} | {us_r:.0f} | {ratio:.2f}x | {same or 'n/a (padded batch)'} |")
    prefill(cm, model, a)
    kv_waste(model, a)


def kv_speed(model, folder, a) -> None:
    """What decoding the cache's codes costs: generate tok/s (prompt + `--new` tokens, whole calls)
    with each KV cache dtype, batch 1 and 4, prompts of 768 random tokens (so each step reads a
    long history; context 1024, as kv_waste), contenders alternated round by round."""
    arts = {}
    for kv in (None, "int8", "fp8"):
        cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3, 4]])},
                          dim_bounds={"batch": (1, 2), "seq": (1, 1024)},
                          generate=llmc.generation.GenerateOptions(max_tokens=512, max_seqs=8), kv_cache_dtype=kv)
        arts[kv or "float32"] = cm
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, model.config.vocab_size, 768).tolist() for _ in range(4)]
    print(f"| batch | KV cache | generate tok/s ({a.new} new, prompts of 768) | vs float |")
    print("|---|---|---|---|")
    for batch in (1, 4):
        times: dict[str, list[float]] = {k: [] for k in arts}
        for cm in arts.values():
            cm.generate(prompts[:batch], max_new_tokens=4, stop_token_ids=())  # warm-up
        for _ in range(a.reps):
            for k, cm in arts.items():
                t = time.perf_counter()
                cm.generate(prompts[:batch], max_new_tokens=a.new, stop_token_ids=())
                times[k].append(time.perf_counter() - t)
        rate = {k: batch * a.new / statistics.median(v) for k, v in times.items()}
        for k, r in rate.items():
            print(f"| {batch} | {k} | {r:.0f} | {r / rate['float32']:.2f}x |")


def prefill(cm, model, a) -> None:
    """One 1 x 256 prompt: the step function (prefill into fresh pages, last row's logits) against
    the forward artifact's call on the same ids (logits for every row) and torch eager."""
    ids = np.random.default_rng(1).integers(1, model.config.vocab_size, (1, 256))
    llm = cm._llm
    pool = llm.pool
    from llmc.runtime.engine.kv_cache import SequenceKv

    seq = SequenceKv(pool)
    seq.reserve(256)
    inputs = {"tokens": ids[0].astype(np.int64), "positions": np.arange(256, dtype=np.int64),
              "logit_rows": np.array([255], np.int64), "page_table": np.asarray([seq.pages], np.int32),
              "kv_lens": np.array([256], np.int32), "q_starts": np.array([0, 256], np.int32),
              **{f"kv_cache.{i}": c for i, c in enumerate(pool.caches)}}
    t_step, last = _time(lambda: llm.step(inputs), 10)  # the engine's CPU step: every thread for 256 rows
    t_fwd, full = _time(lambda: cm(ids.astype(np.int64))[0], 10)
    with torch.no_grad():
        t_torch, ref = _time(lambda: model(torch.from_numpy(ids), use_cache=False).logits, 10)
    seq.release()
    err = float(np.abs(last[0] - full[0, -1]).max())
    print(f"\nprefill 1 x 256: step function {t_step * 1e3:.2f} ms, forward artifact {t_fwd * 1e3:.2f} ms "
          f"({t_step / t_fwd:.2f}x), torch eager {t_torch * 1e3:.2f} ms; last-row logits differ by {err:.1e}")


def kv_waste(model, a) -> None:
    """KV pages on a mixed-length workload: 16 prompts of 64..896 tokens (uniform, seeded), 128
    new tokens each, context 1024 (the small Llama's rotary positions allow it), pages of 16."""
    cm = llmc.compile(model, (), {"input_ids": torch.tensor([[1, 2, 3, 4]])}, dim_bounds={"batch": (1, 2), "seq": (1, 1024)},
                      generate=llmc.generation.GenerateOptions(max_tokens=512, max_seqs=16))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, model.config.vocab_size, int(n)).tolist() for n in rng.integers(64, 897, 16)]
    t = time.perf_counter()
    out = cm.generate(prompts, max_new_tokens=128, stop_token_ids=())
    dt = time.perf_counter() - t
    st = cm._llm.last_stats
    n = sum(len(o.token_ids) for o in out)
    print(f"\nKV waste, mixed lengths (16 prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens "
          f"+ 128 new, pages of 16): {100 * st.waste:.2f}% of the allocated KV slots held no token, averaged "
          f"over {st.steps} steps; {100 * (1 - st.peak_used_slots / st.peak_alloc_slots):.2f}% at the peak "
          f"({st.peak_alloc_slots} slots). {n} new tokens in {dt:.1f}s ({n / dt:.0f} tokens/s, "
          f"{sum(map(len, prompts))} prompt tokens)")


if __name__ == "__main__":
    main()
