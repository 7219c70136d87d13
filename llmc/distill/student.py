"""Build the student from the teacher: the same architecture with fewer layers (each kept
layer's weights copied) and, optionally, fewer MLP channels and attention heads per layer.

The student is made from its own config by transformers (so every per-layer attribute, such
as the KV cache slot each attention layer uses, is right for the new depth), then loaded
with the teacher's tensors renamed and sliced: nothing else about the model class is assumed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import LLMCError

# Width pruning slices these projections (Llama, Mistral, Qwen2 and most decoders since):
# rows of the "in" ones, columns of the "out" one.
ATTN_IN, ATTN_OUT = ("q_proj", "k_proj", "v_proj"), "o_proj"
MLP_IN, MLP_OUT = ("gate_proj", "up_proj"), "down_proj"


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(state-dict prefix, module list) of the model's transformer blocks."""
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and name.rsplit(".", 1)[-1] in ("layers", "h")]
    if len(found) != 1:
        raise LLMCError(f"{type(model).__name__}: cannot find its list of {n} transformer blocks "
                        f"(looked for a `layers` or `h` module list)")
    return found[0][0] + ".", found[0][1]


@dataclass(frozen=True)
class Width:
    """What width pruning keeps in every student layer: MLP channel indices and KV head
    groups (a KV head with the query heads that share it), per kept teacher layer."""
    channels: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]


def check_prunable(model) -> None:
    """Width pruning needs separate q/k/v/o and gate/up/down projections in each block."""
    _, layers = decoder_layers(model)
    block = layers[0]
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    ok = attn is not None and mlp is not None and \
        all(isinstance(getattr(attn, n, None), torch.nn.Linear) for n in (*ATTN_IN, ATTN_OUT)) and \
        all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in (*MLP_IN, MLP_OUT))
    if not ok:
        raise LLMCError(f"--width-ratio: {type(model).__name__} has no Llama-style blocks (self_attn.q/k/v/o_proj, "
                        f"mlp.gate/up/down_proj); only layer pruning works for it")


def student_config(teacher, keep: tuple[int, ...], width: Width | None):
    cfg = copy.deepcopy(teacher.config)
    n = teacher.config.num_hidden_layers
    cfg.num_hidden_layers = len(keep)
    # per-layer lists (sliding/full attention, ...) follow the kept layers
    for key, value in vars(cfg).items():
        if isinstance(value, list) and len(value) == n and key.startswith("layer"):
            setattr(cfg, key, [value[i] for i in keep])
    if width is not None:
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        cfg.head_dim = getattr(teacher.config, "head_dim", None) or cfg.hidden_size // heads
        cfg.num_key_value_heads = len(width.groups[0])
        cfg.num_attention_heads = len(width.groups[0]) * (heads // kv)
        cfg.intermediate_size = len(width.channels[0])
    return cfg


def _slice(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    return t.index_select(dim, index).contiguous()


def _prune_block(sd: dict, prefix: str, channels: tuple[int, ...], groups: tuple[int, ...], cfg_t) -> dict:
    """The block's tensors with only the kept channels / head groups (rows of the input
    projections, columns of the output ones)."""
    out = dict(sd)
    ch = torch.tensor(channels)
    for name in MLP_IN:
        for kind in ("weight", "bias"):
            key = f"{prefix}mlp.{name}.{kind}"
            if key in out:
                out[key] = _slice(out[key], ch, 0)
    out[f"{prefix}mlp.{MLP_OUT}.weight"] = _slice(out[f"{prefix}mlp.{MLP_OUT}.weight"], ch, 1)
    heads, kv = cfg_t.num_attention_heads, cfg_t.num_key_value_heads
    d = getattr(cfg_t, "head_dim", None) or cfg_t.hidden_size // heads
    rep = heads // kv
    kv_rows = torch.tensor([g * d + j for g in groups for j in range(d)])
    q_rows = torch.tensor([(g * rep + r) * d + j for g in groups for r in range(rep) for j in range(d)])
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        for kind in ("weight", "bias"):
            key = f"{prefix}self_attn.{name}.{kind}"
            if key in out:
                out[key] = _slice(out[key], rows, 0)
    out[f"{prefix}self_attn.{ATTN_OUT}.weight"] = _slice(out[f"{prefix}self_attn.{ATTN_OUT}.weight"], q_rows, 1)
    return out


def build_student(teacher, keep: tuple[int, ...], width: Width | None = None):
    """A new model of the teacher's class: layers `keep` (in order) of the teacher, pruned to
    `width` if given; its weights are copies (training it leaves the teacher alone)."""
    import transformers

    prefix, _ = decoder_layers(teacher)
    cfg = student_config(teacher, keep, width)
    student = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    src = teacher.state_dict()
    sd = {}
    for key, value in src.items():
        if not key.startswith(prefix):
            sd[key] = value
            continue
        index, _, rest = key[len(prefix):].partition(".")
        if int(index) in keep:
            sd[f"{prefix}{keep.index(int(index))}.{rest}"] = value
    if width is not None:
        for j in range(len(keep)):
            sd = _prune_block(sd, f"{prefix}{j}.", width.channels[j], width.groups[j], teacher.config)
    sd = {k: v.detach().clone() for k, v in sd.items()}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    # a tied LM head is one tensor under two names; anything else missing is a bug here
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise LLMCError(f"building the student of {type(teacher).__name__}: weights missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    if tied:
        student.tie_weights()
    return student.train()
