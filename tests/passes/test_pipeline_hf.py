"""The default pipeline on tiny Hugging Face models (2 layers, hidden 64) captured by the
torch.export frontend with eager attention, so every pattern is spelled the HF way."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmc.compiler.frontend.hf_models import DECODERS, tiny_model  # noqa: E402
from llmc.compiler.frontend.torch_export import from_torch  # noqa: E402
from llmc.compiler.interpreter import interpret  # noqa: E402
from llmc.compiler.ops import Op  # noqa: E402
from llmc.passes.pipeline import build_program  # noqa: E402
from llmc.passes.plan_memory import verify_plan  # noqa: E402

pytestmark = pytest.mark.slow

# name, pass the padding mask?, norm op, kernels per layer
CASES = [("llama", False, Op.RMS_NORM, 8), ("gpt2", True, Op.LAYER_NORM, 7), ("bert", True, Op.LAYER_NORM, 7)]


@pytest.mark.parametrize("name,with_mask,norm,per_layer", CASES)
def test_tiny_hf_model(name, with_mask, norm, per_layer):
    model, kwargs = tiny_model(name, attn_implementation="eager")
    if not with_mask:
        kwargs.pop("attention_mask")
    graph = from_torch(model, (), kwargs, dim_bounds={"batch": (1, 4), "seq": (1, 128)})
    program, reports = build_program(graph, verify_each=True)
    verify_plan(program)
    out = program.graph
    ops = [n.op for n in out.nodes()]
    assert ops.count(Op.ATTENTION) == 2 and ops.count(norm) == 5
    for op in (Op.SOFTMAX, Op.ERF, Op.SQRT, Op.RSQRT, Op.MEAN, Op.EXP):
        assert op not in ops, op
    atts = [n for n in out.nodes() if n.op is Op.ATTENTION]
    if name == "llama":  # HF's mask built from positions only: causal, and repeat_kv undone
        assert all(a.attrs.causal and not a.attrs.has_mask and a.inputs[1].shape[1] == 2 for a in atts)
    per = program.notes["kernels_per_layer"]
    assert per[0] == per[1] == per_layer
    mp = program.notes["memory_plan"]
    assert mp["planned_bytes"] <= 1.1 * mp["lower_bound_bytes"]

    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    arrays = [feeds[n.attrs.name].numpy() for n in out.inputs]
    call = {k: feeds[k] for k in ("input_ids", "attention_mask") if k in kwargs}
    with torch.no_grad():
        res = model(**call, **({"use_cache": False} if name in DECODERS else {}))
    expected = res.logits if name in DECODERS else res.last_hidden_state
    got = interpret(out, arrays)[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)
