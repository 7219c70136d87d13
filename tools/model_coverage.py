"""Model coverage: compile every decoder/encoder family of the installed transformers.

    python tools/model_coverage.py                 # all families, writes docs/supported_models.md
    python tools/model_coverage.py llama bert      # a few families, table on stdout only
    python tools/model_coverage.py --jobs 2 --timeout 600

Each family is built from a tiny random config (hidden 32-64, 2 layers, 4 heads, vocab
128, seeded), exported through `llmc.compile(model, (), {"input_ids": ..., "attention_mask":
...})` for the CPU (`llvm`), run at two shapes (2x8, the example, and 3x13 with right
padding in one row) and compared with torch eager in fp32 on the first output (logits
for decoders, last_hidden_state for encoders). Tolerance: max abs error <= 1e-4 (absolute;
the outputs of these tiny models are O(0.1-1), the column gives the output scale too).

Status: `works` (matches torch at both shapes); `unsupported` (an `llmc.UnsupportedOpError`
naming the op); `llmc error` (another `llmc.LLMCError`, e.g. torch.export refusing the
model); `bug` (wrong output, a raw exception, a crash or a timeout); `not built` (the
installed transformers cannot build or run the model itself, nothing to do with llmc).
Each family runs in its own subprocess with a timeout, so a crash or hang is contained.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TOL = 1e-4
VOCAB = 128
SHAPES = ((2, 8), (3, 13))
BOUNDS = {"batch": (1, 4), "seq": (1, 32)}
ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "supported_models.md"


@dataclass(frozen=True)
class Family:
    model_type: str
    kind: str  # "decoder" (AutoModelForCausalLM, logits) or "encoder" (AutoModel, last_hidden_state)
    overrides: dict = field(default_factory=dict)
    note: str = ""  # e.g. "mixture of experts, top-k routed"


_D, _E = "decoder", "encoder"
# Families in the installed transformers, with the config tweaks a tiny model needs.
FAMILIES: tuple[Family, ...] = (
    # decoders
    Family("gpt2", _D), Family("gpt_neo", _D, {"attention_types": [[["global", "local"], 1]], "window_size": 4}),
    Family("gpt_neox", _D, {"rotary_pct": 0.5}), Family("gptj", _D, {"rotary_dim": 8}), Family("opt", _D, {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    Family("bloom", _D), Family("falcon", _D, {"new_decoder_architecture": True, "num_kv_heads": 2}),
    Family("llama", _D), Family("mistral", _D), Family("qwen2", _D), Family("qwen3", _D), Family("phi", _D),
    Family("phi3", _D), Family("gemma", _D), Family("gemma2", _D), Family("gemma3_text", _D, {"sliding_window": 4}),
    Family("stablelm", _D), Family("starcoder2", _D), Family("olmo", _D), Family("olmo2", _D), Family("olmo3", _D),
    Family("cohere", _D), Family("cohere2", _D), Family("granite", _D), Family("gpt_bigcode", _D),
    Family("codegen", _D, {"rotary_dim": 8}), Family("biogpt", _D), Family("xglm", _D), Family("mpt", _D),
    Family("persimmon", _D), Family("nemotron", _D), Family("glm", _D), Family("glm4", _D),
    Family("helium", _D), Family("exaone4", _D), Family("smollm3", _D), Family("seed_oss", _D),
    Family("arcee", _D), Family("ernie4_5", _D), Family("ministral", _D), Family("apertus", _D),
    Family("openai-gpt", _D), Family("ctrl", _D), Family("internlm3", _D), Family("hunyuan_v1_dense", _D),
    Family("diffllama", _D), Family("vaultgemma", _D), Family("bitnet", _D), Family("jais2", _D),
    Family("modernbert-decoder", _D), Family("lfm2", _D),
    # mixture of experts (another branch owns them; listed so the table says where they stand)
    Family("mixtral", _D, {"num_local_experts": 4, "num_experts_per_tok": 2}, "mixture of experts, top-k routed"),
    Family("qwen2_moe", _D, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                             "shared_expert_intermediate_size": 32}, "mixture of experts, top-k routed"),
    # encoders
    Family("bert", _E), Family("roberta", _E), Family("distilbert", _E), Family("electra", _E, {"embedding_size": 32}),
    Family("albert", _E, {"embedding_size": 16}), Family("xlm-roberta", _E), Family("deberta-v2", _E),
    Family("deberta", _E), Family("mpnet", _E), Family("camembert", _E), Family("data2vec-text", _E),
    Family("ernie", _E), Family("megatron-bert", _E), Family("roberta-prelayernorm", _E),
    Family("xlm-roberta-xl", _E), Family("roformer", _E, {"embedding_size": 64}), Family("modernbert", _E),
    Family("rembert", _E, {"input_embedding_size": 32, "output_embedding_size": 32}),
    Family("convbert", _E), Family("layoutlm", _E), Family("nomic_bert", _E), Family("eurobert", _E),
    Family("esm", _E, {"pad_token_id": 1, "mask_token_id": 2}), Family("mobilebert", _E, {"embedding_size": 32}),
    Family("squeezebert", _E, {"embedding_size": 64}),
    Family("funnel", _E, {"block_sizes": [1, 1], "d_model": 64, "n_head": 4, "d_head": 16, "d_inner": 128}), Family("ibert", _E), Family("luke", _E),
    Family("xmod", _E, {"languages": ["en_XX"], "default_language": "en_XX"}), Family("big_bird", _E, {"attention_type": "original_full"}),
)
BY_NAME = {f.model_type: f for f in FAMILIES}
ORDER = {f.model_type: i for i, f in enumerate(FAMILIES)}


# ---- one family, in a child process ------------------------------------------------------------
def _config(fam: Family, hidden: int = 64, heads: int = 4):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[fam.model_type]
    kw = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
              intermediate_size=2 * hidden, max_position_embeddings=64, head_dim=hidden // heads,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False, tie_word_embeddings=False)
    if fam.kind == _D:
        kw["num_key_value_heads"] = heads // 2
    else:
        kw["type_vocab_size"] = 2
    kw.update(fam.overrides)
    # sizes a config computes itself (a read-only property) must not be passed
    kw = {k: v for k, v in kw.items() if not isinstance(getattr(cls, k, None), property)}
    return cls(**kw)


def _build(fam: Family):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if fam.kind == _D else AutoModel
    config = _config(fam)
    last: Exception | None = None
    for impl in ("sdpa", "eager"):
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = auto.from_config(config, attn_implementation=impl)
            if hasattr(model, "set_default_language"):  # X-MOD routes through per-language adapters
                model.set_default_language(getattr(config, "default_language", None) or "en_XX")
            return model.eval().float(), impl
        except (ValueError, ImportError, NotImplementedError) as e:  # no SDPA for this family
            last = e
    raise RuntimeError(f"cannot build: {last}")


def _inputs(b: int, s: int, seed: int, pad: bool) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad:
        mask[1, s - 3:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def _first(out):
    import torch

    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    return out[0]


def run_one(name: str) -> dict:
    """Build, compile, run and compare one family; never raises (the result says what happened)."""
    import numpy as np
    import torch

    import llmc

    fam = BY_NAME[name]
    res: dict = {"family": name, "kind": fam.kind, "note": fam.note}
    t0 = time.perf_counter()
    try:
        model, impl = _build(fam)
        res.update(model_class=type(model).__name__, attn=impl)
        extra = {"use_cache": False} if fam.kind == _D else {}
        example = _inputs(*SHAPES[0], seed=1, pad=False)
        with torch.no_grad():
            refs = [(kw, _first(model(**kw, **extra))) for kw in
                    (_inputs(*SHAPES[0], seed=2, pad=False), _inputs(*SHAPES[1], seed=3, pad=True))]
    except Exception as e:  # noqa: BLE001 - transformers itself failed: report, not llmc's bug
        res.update(status="not built", detail=f"{type(e).__name__}: {e}")
        return res
    try:
        cm = llmc.compile(model, (), {**example, **extra}, dim_bounds=BOUNDS)
        errs, scale = [], 0.0
        for kw, ref in refs:
            got = cm(**{k: v.numpy() for k, v in kw.items()})[0]
            ref = ref.float().numpy()
            if got.shape != ref.shape:
                raise AssertionError(f"output shape {got.shape}, torch {ref.shape}")
            errs.append(float(np.abs(got.astype(np.float64) - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
        err = max(errs)
        res.update(max_err=err, scale=scale,
                   status="works" if err <= TOL else "bug",
                   detail="" if err <= TOL else f"wrong output: max abs error {err:.2e} (output scale {scale:.2f})")
    except llmc.UnsupportedOpError as e:
        res.update(status="unsupported", detail=str(e))
    except llmc.LLMCError as e:
        res.update(status="llmc error", detail=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a raw exception is exactly what this tool reports
        res.update(status="bug", detail=f"{type(e).__name__}: {e}",
                   trace="".join(traceback.format_exception(e)[-6:]))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ---- driver ---------------------------------------------------------------------------------
def _run_child(name: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"family": name, "status": "bug", "detail": f"timeout after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr or "").strip().splitlines()[-3:]
    return {"family": name, "status": "bug", "detail": f"crashed (exit {p.returncode}): {' | '.join(tail)}"}


def _cell(text: str, n: int = 160) -> str:
    # the source location ("; at File ...") names this machine's paths: the op and module suffice
    text = re.sub(r";? at File .*", "", " ".join(str(text).split())).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def table(results: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        "# Supported models",
        "",
        "Generated by `python tools/model_coverage.py` from the installed transformers: each family",
        "built from a tiny random config (hidden 64, 2 layers, 4 heads, vocab 128, seeded), compiled",
        "with `llmc.compile` for the CPU and compared with torch eager (fp32) at batch x seq 2x8 and",
        f"3x13 (one row right-padded). `works` = max abs error <= {TOL:g} on the first output",
        "(logits / last_hidden_state) at both shapes. `unsupported` = a clear `UnsupportedOpError`",
        "naming the op; `llmc error` = another `LLMCError`; `bug` = wrong output, raw exception, crash",
        "or timeout; `not built` = the installed transformers could not build the tiny model.",
        "",
        "Summary: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" (of {len(results)})",
        "",
        "| family | model class | attention | status | max abs error / cause |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        what = f"{r['max_err']:.1e}" if r["status"] == "works" else _cell(r.get("detail", ""))
        if r.get("note"):
            what = f"{r['note']}; {what}"
        lines.append(f"| {r['family']} | {r.get('model_class', '')} | {r.get('attn', '')} | {r['status']} | {what} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="*", help="model types to run (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=1, help="families compiled in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per family (default 900)")
    ap.add_argument("--out", type=Path, default=None, help=f"table file (default: {TABLE.relative_to(ROOT)} "
                    "when all families run, else none)")
    ap.add_argument("--results", type=Path, default=None,
                    help="a JSON-lines file: each result is appended as it finishes, and families already "
                    "in it are not run again (resume an interrupted run; delete the file to start afresh)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child)), flush=True)
        return 0
    names = args.families or [f.model_type for f in FAMILIES]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(BY_NAME)}")

    done: dict[str, dict] = {}
    if args.results and args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done[r["family"]] = r
    lock = threading.Lock()

    def one(name: str) -> dict:
        if name in done:
            return done[name]
        r = _run_child(name, args.timeout)
        if args.results:
            with lock, args.results.open("a") as f:
                f.write(json.dumps(r) + "\n")
        err = f" {r['max_err']:.1e}" if "max_err" in r else ""
        print(f"[{r['status']:>11}] {name}{err} {_cell(r.get('detail', ''), 140)}", flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, names))
    text = table(sorted(results, key=lambda r: ORDER[r["family"]]))
    out = args.out or (TABLE if not args.families else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text)
    works = sum(r["status"] == "works" for r in results)
    print(f"{works} of {len(results)} families match torch at {TOL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
