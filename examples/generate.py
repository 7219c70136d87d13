"""Text generation quickstart: train (or reuse) llmc's small Llama on the Python standard
library, compile its Hugging Face folder with `llmc compile` (the forward and the paged-KV
step function in one artifact), then generate with the runtime alone and check the greedy
tokens against transformers' own generate.

    python examples/generate.py
"""
import pathlib
import subprocess
import sys
import tempfile
import time

import llmc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
from train_tiny_llama import trained_model  # noqa: E402

PROMPTS = ["def __init__(self, ", "import os\nimport sys\n\n\ndef main(", "class Queue:\n    \"\"\""]


def main() -> None:
    folder = trained_model()
    with tempfile.TemporaryDirectory() as tmp:
        art = pathlib.Path(tmp) / "tiny-llama.llmc"
        subprocess.run([sys.executable, "-m", "llmc", "compile", str(folder), "-o", str(art), "--seq-len", "256"],
                       check=True)
        llm = llmc.load(art)
        t = time.perf_counter()
        outs = llm.generate(PROMPTS, max_new_tokens=48)
        dt = time.perf_counter() - t
        for p, o in zip(PROMPTS, outs):
            print(f"--- {p!r} ->\n{p}{o.text}\n")
        n = sum(len(o.token_ids) for o in outs)
        print(f"llmc: {n} tokens in {dt:.2f}s ({n / dt:.0f} tokens/s, {len(PROMPTS)} prompts in one batch)")

        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        for p, o in zip(PROMPTS, outs):
            ids = llm.tokenizer.encode(p).ids
            ref = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
            assert ref == o.token_ids, (p, ref, o.token_ids)
        print("greedy tokens identical to transformers' generate")


if __name__ == "__main__":
    main()
