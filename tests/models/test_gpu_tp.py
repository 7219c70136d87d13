"""Tensor and pipeline parallelism on GPUs: greedy tokens of the trained tiny model identical at TP = 1,
2 and 4, PP = 2 and TP 2 x PP 2 (one process per GPU, NCCL inside the step's CUDA graphs), run on
the 2/4-GPU machines.

    python tests/models/test_gpu_tp.py --prepare gpu_art/tp       # build host: compile tp 1, 2, 4, pp 2, tp 2 x pp 2
    pytest -m gpu tests/models/test_gpu_tp.py                      # GPU machine (LLMC_GPU_TP=gpu_art/tp)
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(os.environ.get("LLMC_GPU_TP", "gpu_art/tp"))
NEW = 24
TPS = (1, 2, 4)


def _gpus() -> int:
    try:
        from llmc.runtime.dist.nccl import device_count

        return device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return 0


def _prompts() -> list[list[int]]:
    return json.loads((ROOT / "prompts.json").read_text())


def _tokens(art: pathlib.Path, tp: int) -> list[list[int]]:
    from llmc.runtime.dist.launch import launch

    out, err = io.StringIO(), io.StringIO()
    argv = [sys.executable, "-m", "llmc.runtime.tp_run", "generate", str(art), "--max-new-tokens", str(NEW)]
    for p in _prompts():
        argv += ["--ids", ",".join(map(str, p))]
    launch(argv, tp, stdout=out, stderr=err, timeout=300, label=False)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out.getvalue() + err.getvalue()
    return json.loads(lines[0])["token_ids"]


def _whole_tokens(art: pathlib.Path) -> list[list[int]]:
    import llmc

    llm = llmc.load(art, device="cuda")
    return [o.token_ids for o in llm.generate(_prompts(), max_new_tokens=NEW, stop_token_ids=())]


@pytest.mark.gpu
def test_greedy_tokens_identical_at_tp_1_2_4():
    if not (ROOT / "tp1").exists():
        pytest.skip(f"no prepared artifacts under {ROOT} (run --prepare on the build host)")
    want = _whole_tokens(ROOT / "tp1")
    assert all(len(t) == NEW for t in want)
    ran = []
    for tp in TPS[1:]:
        if tp > _gpus() or not (ROOT / f"tp{tp}").exists():  # a device call may carry only some of them
            continue
        got = _tokens(ROOT / f"tp{tp}", tp)
        assert got == want, f"tp {tp}: {got} != tp 1: {want}"
        ran.append(tp)
    if not ran:
        pytest.skip("fewer than 2 GPUs, or no tp2 / tp4 artifact")


def _check_against_whole(name: str, ranks: int) -> None:
    """The prepared artifact `name`, run as `ranks` processes, gives the whole model's tokens."""
    if not (ROOT / name).exists():
        pytest.skip(f"no prepared {name} artifact under {ROOT} (run --prepare on the build host)")
    if _gpus() < ranks:
        pytest.skip(f"fewer than {ranks} GPUs")
    want = _whole_tokens(ROOT / "tp1")
    got = _tokens(ROOT / name, ranks)
    assert got == want, f"{name}: {got} != whole model: {want}"


@pytest.mark.gpu
def test_greedy_tokens_identical_at_pp_2():
    """Two pipeline stages on two GPUs (NCCL send/recv of the residual stream inside each stage's
    CUDA graph, the last stage's logits broadcast) give the whole model's tokens."""
    _check_against_whole("pp2", 2)


@pytest.mark.gpu
def test_greedy_tokens_identical_at_tp_2_by_pp_2():
    """Four GPUs, 2 stages of 2 shards (rank = stage * 2 + shard): all-reduces over the stage's
    shards and SEND / RECV along each shard's stages, on NCCL groups split off the job's
    communicator, inside the CUDA graphs: the whole model's tokens."""
    _check_against_whole("tp2pp2", 4)


def _margin(model, prompt: list[int]) -> float:
    import torch

    x, worst = torch.tensor([prompt]), float("inf")
    with torch.no_grad():
        for _ in range(NEW):
            top = model(x).logits[0, -1].topk(2)
            worst = min(worst, float(top.values[0] - top.values[1]))
            x = torch.cat([x, top.indices[:1].view(1, 1)], 1)
    return worst


def prepare(out: pathlib.Path, arch: str = "sm_90") -> None:
    """The repo's trained tiny Llama (tools/train_tiny_llama.py) in bf16 at TP 1, 2, 4, and prompts
    cut from its held-out text: a trained model's logits rarely tie, so bf16 sums in another order
    (the all-reduce) do not flip its greedy tokens as they can a random model's near-ties."""
    import torch
    import transformers

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))
    from train_tiny_llama import trained_model
    from tokenizers import Tokenizer

    import llmc
    from llmc.generation import GenerateOptions

    folder = trained_model()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = (folder / "heldout.txt").read_text() if (folder / "heldout.txt").exists() else (folder.parent / "heldout.txt").read_text()
    ids = tok.encode(text[:20000]).ids
    # windows whose fp32 greedy run keeps its top two logits >= 0.09 apart for NEW tokens (3 bf16
    # ulps at the logits' size): closer ones are ties that bf16 sums in any order may flip
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [p for p in (ids[a:a + n] for a, n in ((0, 12), (300, 40), (700, 7), (1100, 20), (1500, 9),
                                                     (1900, 30), (2300, 15), (2700, 25)))
               if _margin(fp32, p) >= 0.09][:3]
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps(prompts))
    example = torch.randint(3, 1000, (1, 8))
    for name, kw in [*((f"tp{tp}", {"tp": tp}) for tp in TPS), ("pp2", {"pp": 2}), ("tp2pp2", {"tp": 2, "pp": 2})]:
        cm = llmc.compile(model, (example,), target=f"cuda:{arch}", dim_bounds={"batch": (1, 4), "seq": (1, 128)},
                          generate=GenerateOptions(max_tokens=64, max_seqs=8), progress=print, **kw)
        cm.export(out / name)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--prepare":
        prepare(pathlib.Path(sys.argv[2]))
