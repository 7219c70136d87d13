"""Tiny random causal LMs of real transformers families, for the generation tests: each
family with the feature the step function must keep (GQA, QKV bias, tied embeddings,
sliding window, partial rotary, Llama 3 rope scaling, learned positions)."""
from __future__ import annotations

import torch
import transformers

VOCAB = 96
# family: config overrides
FAMILIES = {
    "llama": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "qwen2": {},  # biases in q/k/v
    "mistral": {"sliding_window": 6},  # window shorter than the sequences
    "gpt2": {"tie_word_embeddings": True, "initializer_range": 0.3},  # learned positions, tied LM head
    "phi3": {"partial_rotary_factor": 0.5},
    "gemma": {"tie_word_embeddings": True, "initializer_range": 0.3},
}


def tiny_causal_lm(family: str, seed: int = 0, layers: int = 2, **overrides) -> torch.nn.Module:
    cls = transformers.CONFIG_MAPPING[family]
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=128, head_dim=8, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, use_cache=False, tie_word_embeddings=False)
    kw.update(FAMILIES[family])
    kw.update(overrides)  # e.g. the GPU tests' head_dim=32 (the paged kernel's smallest)
    config = cls(**{k: v for k, v in kw.items() if not isinstance(getattr(cls, k, None), property)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def hf_greedy(model: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    """transformers' generate, greedy, never stopping early."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert len(out) == new  # (min_new_tokens would not do: it bans the eos id instead)
    return out


class recorded_steps:
    """`with recorded_steps(llm) as steps:` every step call of llm.generate inside the block is
    appended to `steps` as (inputs without the KV caches, logits): greedy steps too, which then
    take their argmax from those logits instead of the device's."""

    def __init__(self, llm):
        self.llm, self.steps = llm, []

    def __enter__(self) -> list:
        import numpy as np

        llm, orig = self.llm, self.llm.step_logits

        def spy(inputs):
            logits = orig(inputs)
            self.steps.append(({k: np.array(v) for k, v in inputs.items() if not k.startswith("kv_cache")},
                               np.array(logits)))
            return logits

        llm.step_logits = spy
        llm.step_greedy = lambda inputs: np.argmax(spy(inputs), axis=1)
        return self.steps

    def __exit__(self, *exc) -> None:
        del self.llm.step_logits, self.llm.step_greedy  # the class's methods again
