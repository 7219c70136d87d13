"""The README's Python snippet runs as written, and the README documents every CLI flag."""
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_python_snippet_runs_as_written(tmp_path, monkeypatch):
    first, generation = python_blocks()  # the second continues the first (same model)
    monkeypatch.chdir(tmp_path)  # the snippets export into the current folder
    import torch

    torch.manual_seed(0)  # the snippet's random model: the same one every run (greedy ties are not flaky)
    namespace: dict = {}
    exec(compile(first, str(README), "exec"), namespace)
    assert (tmp_path / "llama.llmc" / "manifest.json").is_file()
    import torch

    with torch.no_grad():
        ref = namespace["model"](namespace["ids"], use_cache=False).logits.numpy()
    assert np.abs(namespace["logits"] - ref).max() <= 1e-4  # the reloaded artifact's output
    exec(compile(generation, str(README), "exec"), namespace)
    from causal_lms import hf_greedy

    want = hf_greedy(namespace["model"], [1, 5, 9], 32)
    eos = namespace["model"].generation_config.eos_token_id  # generate() stops there by default
    want = want[:want.index(eos) + 1] if eos in want else want
    assert namespace["out"][0].token_ids == want and namespace["again"][0].token_ids == want


def test_every_cli_flag_is_documented():
    from llmc.cli import build_parser

    text = README.read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps subparsers here
    assert set(commands) == {"compile", "run", "inspect", "bench", "generate", "serve", "bench-serve", "distill"}
    for name, sub in commands.items():
        assert f"llmc {name}" in text, name
        for action in sub._actions:
            longest = max(action.option_strings, key=len, default=None)
            if longest and longest != "--help":
                assert longest in text, f"llmc {name} {longest} is not in the README"
    for name in ("tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-bert", "minilm", "x86-64-v3",
                 "--cpu native", "docs/gpu.md", "trust"):
        assert name in text, name
