"""Train llmc's small real model: a Llama-architecture causal LM (about 4M parameters) on the
Python standard library's own source, with a byte-level BPE tokenizer, saved as a Hugging
Face folder. Every machine with Python has the text, so nothing is downloaded.

    python tools/train_tiny_llama.py                 # train (about 5 minutes on 2 cores) or reuse
    python tools/train_tiny_llama.py --out DIR       # somewhere else
    python tools/train_tiny_llama.py --steps 4000 --batch 32 --text-mb 10 --device cuda --out DIR
                                                     # a longer-trained teacher (for llmc distill)

The result is cached under ~/.cache/llmc/trained/ keyed by the training recipe, so tests
and examples train it once. Held-out text (every 10th stdlib file, never trained on) is
saved beside it as heldout.txt for perplexity checks. Deterministic for a given torch
version and thread count (seeded data order and initialisation).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import sys
import sysconfig
import time

try:
    import fcntl
except ImportError:  # not POSIX: concurrent trainers each train (the folder is written atomically)
    fcntl = None

RECIPE = {
    "vocab": 4096, "hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 704, "context": 256,
    "steps": 500, "batch": 16, "seq": 128, "lr": 2e-3, "warmup": 50, "seed": 0, "text_mb": 6, "version": 2,
}
NAME = "tiny-llama-stdlib"


def recipe_key(recipe: dict = RECIPE) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def default_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "llmc" / "trained" / \
        f"{NAME}-{recipe_key()}"


def stdlib_texts(megabytes: float) -> tuple[list[str], list[str]]:
    """(train, held-out) source texts: sorted stdlib .py files (tests excluded), every 10th held out."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "encodings", "pydoc_data", "__phello__"}  # tables, not prose
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.parts))
    train, held, size = [], [], 0
    for i, f in enumerate(files):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if i % 10 == 0 else train).append(text)
        size += len(text)
        if size > megabytes * 1e6:
            break
    return train, held


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def train(out: pathlib.Path, recipe: dict = RECIPE, log=print, device: str = "cpu",
          texts: tuple[list[str], list[str]] | None = None) -> pathlib.Path:
    """Train to `out`. `texts`: (train, held-out) in place of this Python's stdlib (e.g. another
    machine's, dumped with --dump-texts, so a GPU machine trains on the same text)."""
    import numpy as np
    import torch
    import transformers

    t0 = time.perf_counter()
    train_texts, held = texts if texts is not None else stdlib_texts(recipe["text_mb"])
    tok = train_tokenizer(train_texts, recipe["vocab"])
    eos = tok.token_to_id("<|endoftext|>")
    ids = np.concatenate([np.asarray(tok.encode(t).ids + [eos], np.int64) for t in train_texts])
    log(f"{len(train_texts)} files, {ids.size} training tokens; tokenizer in {time.perf_counter() - t0:.0f}s")
    cfg = transformers.LlamaConfig(
        vocab_size=recipe["vocab"], hidden_size=recipe["hidden"], num_hidden_layers=recipe["layers"],
        num_attention_heads=recipe["heads"], num_key_value_heads=recipe["kv_heads"],
        intermediate_size=recipe["ffn"], max_position_embeddings=recipe["context"], tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, rms_norm_eps=1e-5)
    torch.manual_seed(recipe["seed"])
    model = transformers.LlamaForCausalLM(cfg).to(device)
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    steps, warm = recipe["steps"], recipe["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(recipe["seed"])
    b, s = recipe["batch"], recipe["seq"]
    model.train()
    for step in range(steps):
        starts = rng.integers(0, ids.size - s - 1, b)
        x = torch.from_numpy(np.stack([ids[i:i + s + 1] for i in starts])).to(device)
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone(), use_cache=False).loss
        # labels are shifted inside the model: predicting x[t+1] from x[:t+1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f}s")
    model.to("cpu").eval()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(tmp)
    (tmp / "heldout.txt").write_text("\n".join(held), encoding="utf-8")
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log(f"saved {out} in {time.perf_counter() - t0:.0f}s")
    return out


def trained_model(out: pathlib.Path | None = None, log=print) -> pathlib.Path:
    """The trained model's folder, training it first if it is not cached."""
    out = pathlib.Path(out) if out else default_dir()
    if (out / "recipe.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # one trainer at a time (parallel test workers): the others wait and take its folder instead
    # of training the same model alongside it for ~5 minutes
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "recipe.json").is_file():
            return out
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))  # the recipe's timing and bits assume 2 threads
        return train(out, log=log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder to write (default: the cache)")
    p.add_argument("--steps", type=int, help=f"train longer or shorter than the recipe's {RECIPE['steps']} steps "
                                             "(a stronger teacher for distillation; --out required)")
    p.add_argument("--batch", type=int, help=f"sequences per step (recipe: {RECIPE['batch']})")
    p.add_argument("--text-mb", type=float, help=f"megabytes of stdlib source read (recipe: {RECIPE['text_mb']})")
    p.add_argument("--device", default="cpu", help="cpu | cuda (with --steps)")
    p.add_argument("--texts", help="train on this JSON [train texts, held-out texts] (from --dump-texts) instead "
                                   "of this Python's stdlib")
    p.add_argument("--dump-texts", help="write the recipe's (or --text-mb's) texts here as JSON and stop")
    a = p.parse_args(argv)
    recipe = dict(RECIPE, **{k: v for k, v in (("steps", a.steps), ("batch", a.batch), ("text_mb", a.text_mb))
                             if v is not None})
    if a.dump_texts:
        pathlib.Path(a.dump_texts).write_text(json.dumps(stdlib_texts(recipe["text_mb"])))
        return 0
    if recipe == RECIPE and a.texts is None and a.device == "cpu":
        print(trained_model(pathlib.Path(a.out) if a.out else None))
        return 0
    if not a.out:
        p.error("a recipe other than the default needs --out")
    import torch

    torch.manual_seed(recipe["seed"])
    texts = tuple(json.loads(pathlib.Path(a.texts).read_text())) if a.texts else None
    print(train(pathlib.Path(a.out), recipe, device=a.device, texts=texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
