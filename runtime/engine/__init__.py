"""The LLM engine: a paged KV cache (kv_cache), token sampling (sampler), the paged
attention kernel the step function calls (paged_attention) and text generation over a
compiled step function (generate). Imports no compiler code."""
