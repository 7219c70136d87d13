"""Model specs for benchmarks: `pkg.module:function` sources that `llmc compile` and
`llmc bench --model` both accept, so the artifact and the torch baseline are one model.

Each function returns (model, example_args, example_kwargs) and reads LLMC_BENCH_DEVICE
("cpu" to compile, "cuda" in `llmc bench`), LLMC_BENCH_BATCH and LLMC_BENCH_SEQ for the
example inputs. Weights are random (seeded): latency does not depend on their values.
"""
from __future__ import annotations

import os


def _env() -> tuple[str, int, int]:
    return (os.environ.get("LLMC_BENCH_DEVICE", "cpu"), int(os.environ.get("LLMC_BENCH_BATCH", "2")),
            int(os.environ.get("LLMC_BENCH_SEQ", "16")))


def _build(cls, config, dtype, device: str):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = cls(config)
    return model.to(dtype).eval()


def llama_1b():
    """Llama-3.2-1B's shape: hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocab
    128256, tied embeddings, bf16; causal LM on input_ids only (no padding mask)."""
    import torch
    import transformers as T

    device, batch, seq = _env()
    cfg = T.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048,
                        rope_theta=500000.0, tie_word_embeddings=True, attn_implementation="sdpa")
    model = _build(T.LlamaForCausalLM, cfg, torch.bfloat16, device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    return model, (), {"input_ids": ids, "use_cache": False}


def llama_8b():
    """Llama-3.1-8B's shape: hidden 4096, 32 heads / 8 KV heads of 128, MLP 14336, vocab 128256,
    untied LM head, bf16. LLMC_BENCH_LAYERS sets the depth (default the full 32; a build host
    needs about 3x the weights' bytes of memory to capture and compile, 16 GB per 32 layers)."""
    import torch
    import transformers as T

    device, batch, seq = _env()
    layers = int(os.environ.get("LLMC_BENCH_LAYERS", "32"))
    cfg = T.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                        rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    model = _build(T.LlamaForCausalLM, cfg, torch.bfloat16, device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    return model, (), {"input_ids": ids, "use_cache": False}


def minilm_shape():
    """all-MiniLM-L6-v2's shape (BERT: hidden 384, 6 layers, 12 heads of 32, MLP 1536), fp16,
    random weights; input_ids + an all-ones attention_mask."""
    import torch
    import transformers as T

    device, batch, seq = _env()
    cfg = T.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                       intermediate_size=1536, max_position_embeddings=512, attn_implementation="sdpa")
    model = _build(T.BertModel, cfg, torch.float16, device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    return model, (), {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64, device=device)}


__all__ = ["llama_1b", "llama_8b", "minilm_shape"]
