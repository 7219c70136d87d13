"""llmc.passes: Graph -> Graph rewrites, one concern per module, and the pipeline driver.

pattern / rewrite    the pattern language and the (pattern, replacement) rule driver
index_bounds         input index ranges (input_index_checks); symbol bounds lowered to fit tables
simplify             identity ops, layout/cast chains, constants, pre-transposed weights, CSE
fuse_norms           spelled-out RMSNorm / LayerNorm -> RMS_NORM / LAYER_NORM
fuse_activations     spelled-out GELU (erf, tanh) / SiLU -> GELU / SILU
fuse_attention       matmul-softmax-matmul -> ATTENTION; GQA instead of repeat_kv; causal masks
fuse_moe             gathered-expert mat-vecs (HF batched_mm experts) -> ROUTED_MATMUL
merge_projections    Q/K/V and gate/up projections -> one GEMM on concatenated weights
partition            fused_grouping: which nodes each kernel computes
plan_memory          arena offsets of intermediate buffers
pipeline / report    DEFAULT_PIPELINE, run_pipeline, build_program, format_report
"""
