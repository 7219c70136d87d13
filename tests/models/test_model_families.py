"""End to end over model families that the broadened ATen rules made compile (see
tools/model_coverage.py and docs/supported_models.md): real transformers code, tiny random
configs, one `llmc.compile` of all of them at once (one kernel build), against torch eager
in fp32 at 1e-4, at a shape other than the example's and with padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llmc

transformers = pytest.importorskip("transformers")

VOCAB = 96
# family: (AutoModel kind, config overrides, the op the family needed)
FAMILIES = {
    "falcon": ("decoder", {"new_decoder_architecture": True, "num_kv_heads": 2}, "broadcast_to"),
    "gptj": ("decoder", {"rotary_dim": 4}, "repeat_interleave"),
    "ctrl": ("decoder", {}, "mul_ (in place)"),
    "mpt": ("decoder", {}, "max(0, n - seq) as a size"),
    "mpnet": ("encoder", {}, "min.other"),
    "megatron-bert": ("encoder", {}, "add_ (in place)"),
    # wrong output once (no error): a fused head split raced across threads; a finfo.min fill
    "bloom": ("decoder", {}, "QKV head split fused into the matmul tiles"),
    "persimmon": ("decoder", {}, "QKV head split fused into the matmul tiles"),
    "deberta": ("encoder", {}, "masked_fill(finfo.min) on fully masked padded rows"),
}


def _model(name: str, kind: str, overrides: dict) -> torch.nn.Module:
    cls = transformers.CONFIG_MAPPING[name]
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, use_cache=False, tie_word_embeddings=False, **overrides)
    config = cls(**{k: v for k, v in kw.items() if not isinstance(getattr(cls, k, None), property)})
    auto = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = auto.from_config(config, attn_implementation="sdpa")
        except ValueError:  # no SDPA attention in this family
            model = auto.from_config(config, attn_implementation="eager")
    return model.eval()


class AllFamilies(torch.nn.Module):
    """Every family's model on the same ids/mask; returns each one's first output."""

    def __init__(self):
        super().__init__()
        self.names = list(FAMILIES)
        self.models = torch.nn.ModuleList(_model(n, k, o) for n, (k, o, _) in FAMILIES.items())

    def forward(self, input_ids, attention_mask):
        outs = []
        for name, m in zip(self.names, self.models):
            extra = {"use_cache": False} if FAMILIES[name][0] == "decoder" else {}
            out = m(input_ids=input_ids, attention_mask=attention_mask, **extra)
            outs.append(out.logits if FAMILIES[name][0] == "decoder" else out.last_hidden_state)
        return tuple(outs)


def _inputs(b: int, s: int, seed: int, pad: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad:
        mask[1, s - 3:] = 0  # right padding in the second row
    return {"input_ids": torch.randint(3, VOCAB, (b, s), generator=g), "attention_mask": mask}


@pytest.fixture(scope="module")
def compiled():
    model = AllFamilies().eval()
    cm = llmc.compile(model, (), _inputs(2, 8, seed=1, pad=False), dim_bounds={"batch": (1, 4), "seq": (1, 32)})
    return model, cm


@pytest.mark.parametrize("b, s, pad", [(2, 8, False), (3, 13, True), (1, 5, False)])
def test_families_match_torch(compiled, b, s, pad):
    model, cm = compiled
    kw = _inputs(b, s, seed=10 * b + s, pad=pad)
    with torch.no_grad():
        refs = model(**kw)
    got = cm(**{k: v.numpy() for k, v in kw.items()})
    assert len(got) == len(FAMILIES)
    for name, g, r in zip(FAMILIES, got, refs):
        r = r.numpy()
        assert g.shape == r.shape, name
        err = float(np.abs(g - r).max())
        assert err <= 1e-4, f"{name} ({FAMILIES[name][2]}) {b}x{s}: max abs error {err:.2e}"
        assert np.abs(r).max() > 1e-3, f"{name}: a degenerate (all-zero) reference proves nothing"
