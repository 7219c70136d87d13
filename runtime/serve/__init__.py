"""The serving engine: continuous batching over a compiled step function (engine), the
scheduler and its policies (scheduler, policy), KV page bookkeeping with prefix sharing
and swap (block_manager), and the OpenAI-compatible HTTP front (server: the one module
here that imports a web stack). Imports no compiler code, torch or transformers."""
