"""Mixture-of-experts decoders (tiny random Mixtral and Qwen2-MoE, real HF model code)
through llmc.compile, against torch eager fp32 (the model's own default experts
implementation), one compile per model for every shape; and, at decode size, the
kernels read only the experts the router picked."""
import numpy as np
import pytest
import torch

import llmc
from llmc.backends.artifact import weights_of
from llmc.runtime.executor import Executor
from llmc.runtime.manifest import Manifest

BOUNDS = {"batch": (1, 4), "seq": (1, 32)}
SHAPES = [(1, 1), (2, 1), (1, 3), (2, 7), (2, 16)]  # (1, 1), (2, 1): decode-sized
LAYERS, TOP_K = 2, 2


def _tiny(name: str):
    import transformers as T

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=TOP_K,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "mixtral":
        cls, cfg = T.MixtralForCausalLM, T.MixtralConfig(**common, intermediate_size=96, num_local_experts=8)
    else:  # routed experts plus a sigmoid-gated shared expert
        cls, cfg = T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                                         shared_expert_intermediate_size=48, num_experts=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg)
    return model.eval()


def _inputs(b: int, s: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1 and s > 3:
        mask[1, s - 3:] = 0  # right padding in the second row
    return {"input_ids": torch.randint(3, 128, (b, s), generator=g), "attention_mask": mask}


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def compiled(request):
    model = _tiny(request.param)
    before = model.get_experts_implementation()
    cm = llmc.compile(model, (), {**_inputs(2, 8, seed=0), "use_cache": False}, dim_bounds=BOUNDS)
    return request.param, model, cm, before


def test_matches_torch_eager(compiled):
    name, model, cm, _ = compiled
    for i, (b, s) in enumerate(SHAPES):
        kw = _inputs(b, s, seed=10 + i)
        with torch.no_grad():
            ref = model(**kw, use_cache=False).logits.numpy()
        got = cm(**{k: v.numpy() for k, v in kw.items()})[0]
        assert got.shape == ref.shape
        err = np.abs(got - ref).max()
        assert err <= 1e-4, f"{name} {b}x{s}: max abs error {err:.2e}"


def test_experts_are_routed_matmuls(compiled):
    name, model, cm, before = compiled
    nodes = cm.program.graph.nodes()
    ops = [n.op.name for n in nodes]
    assert ops.count("TOPK") == LAYERS
    assert ops.count("ROUTED_MATMUL") == 2 * LAYERS  # gate_up and down of every layer
    # no gathered copy of expert weights anywhere: they are read only by the routed kernels
    experts = {n.attrs.name for n in nodes if n.op.name == "WEIGHT" and ".experts." in n.attrs.name}
    assert len(experts) == 2 * LAYERS
    readers = {n.op.name for n in nodes for i in n.inputs if i.op.name == "WEIGHT" and i.attrs.name in experts}
    assert readers == {"ROUTED_MATMUL"}
    assert "fuse_moe" in cm.report and f"routed_matmul: {2 * LAYERS} fused, 0" in cm.report
    assert model.get_experts_implementation() == before  # the capture switch was undone


def _chosen_experts(model, kw) -> dict[str, set[int]]:
    """experts module path -> the expert ids its router picked in torch, for these inputs."""
    picked: dict[str, set[int]] = {}
    hooks = []
    for path, m in model.named_modules():
        if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, p=path: picked.setdefault(p, set()).update(args[1].flatten().tolist())))
    try:
        with torch.no_grad():
            model(**kw, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return picked


def test_decode_reads_only_the_chosen_experts(compiled):
    """Every expert the router did not pick for a decode step is NaN in the compiled model's
    weights: its output stays finite and equal to torch's (a dense or masked formulation,
    reading all experts, would return NaN)."""
    name, model, cm, _ = compiled
    kw = _inputs(1, 1, seed=99)
    picked = _chosen_experts(model, kw)
    assert len(picked) == LAYERS and all(len(v) == TOP_K for v in picked.values())
    weights = dict(weights_of(cm.program))
    for path, chosen in picked.items():
        for proj in ("gate_up_proj", "down_proj"):
            w = weights[f"{path}.{proj}"].copy()
            others = [e for e in range(w.shape[0]) if e not in chosen]
            w[others] = np.nan
            weights[f"{path}.{proj}"] = w
    poisoned = Executor(Manifest.from_json(cm.manifest, "test"), cm.executable.mod, weights, "cpu")
    got = poisoned(**{k: v.numpy() for k, v in kw.items()})[0]
    with torch.no_grad():
        ref = model(**kw, use_cache=False).logits.numpy()
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 1e-4
