import pytest

from pass_graphs import assert_same, counts, llama, minilm
from llmc.compiler.ir import Graph
from llmc.compiler.ops import Op
from llmc.compiler.verifier import VerifyError
from llmc.passes.pipeline import DEFAULT_PIPELINE, build_program, format_report, run_pipeline
from llmc.passes.plan_memory import verify_plan
from llmc.passes.report import PassReport


@pytest.mark.parametrize("model", [llama, minilm])
def test_default_pipeline_fuses_everything_and_keeps_outputs(model, tmp_path):
    graph = model()
    out, reports = run_pipeline(graph, verify_each=True, dump_dir=tmp_path)
    assert [r.name for r in reports] == [p.__name__ for p in DEFAULT_PIPELINE]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[:4] == ["00_input.txt", "01_bound_symbols_by_tables.txt", "02_simplify.txt",
                         "03_fuse_norms.txt"] and len(files) == len(DEFAULT_PIPELINE) + 1
    assert "attention" in (tmp_path / "05_fuse_attention.txt").read_text()
    c = counts(out)
    assert c[Op.ATTENTION] == 2 and c[Op.SOFTMAX] == c[Op.SQRT] == c[Op.RSQRT] == c[Op.MEAN] == 0
    assert c[Op.RMS_NORM if model is llama else Op.LAYER_NORM] == 5
    by_name = {r.name: r for r in reports}
    assert by_name["fuse_attention"].counts["attention_left"] == 0
    assert_same(graph, out)


def test_build_program_and_report():
    program, reports = build_program(llama())
    verify_plan(program)
    text = format_report(reports, program.graph, program)
    for needle in ("attention: 2 fused, 0 left", "rms_norm: 5 fused", "qkv: 2 merged", "gate_up: 2 merged",
                   "unfused ops by kind: none", "per transformer layer: 8 (x2 layers)", "memory: planned"):
        assert needle in text, (needle, text)
    assert program.notes["memory_plan"]["planned_bytes"] == program.arena_bytes


def test_verify_each_names_the_failing_pass():
    def broken(graph: Graph):
        out = graph.outputs[0]
        bad = type(out)(out.op, out.inputs, out.attrs, type(out.type)(out.shape, out.dtype.__class__("float16")))
        return graph.with_outputs([bad]), PassReport("broken")

    with pytest.raises(VerifyError, match="after pass broken"):
        run_pipeline(llama(n_layers=1), [broken], verify_each=True)
