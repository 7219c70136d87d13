"""runtime/cpu_features.py: the host-CPU check an artifact's `cpu` section goes through."""
import platform

import pytest

from llmc.errors import ArtifactError
from llmc.runtime.cpu_features import check_host_cpu, host_cpu_features

TRIPLE = {"x86_64": "x86_64-unknown-linux-gnu", "amd64": "x86_64-unknown-linux-gnu",
          "aarch64": "aarch64-unknown-linux-gnu", "arm64": "aarch64-unknown-linux-gnu"}.get(platform.machine().lower(),
                                                                                          platform.machine() + "-linux")


def test_host_features_are_numpy_names():
    feats = host_cpu_features()
    assert isinstance(feats, frozenset) and feats
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert {"SSE", "SSE2"} <= feats  # the x86-64 floor


def test_features_the_host_has_pass():
    have = sorted(host_cpu_features())[:5]
    check_host_cpu({"triple": TRIPLE, "mcpu": "whatever", "features": have}, "model.llmc")
    check_host_cpu({"triple": TRIPLE, "mcpu": "generic", "features": []}, "model.llmc")


def test_missing_features_are_named():
    section = {"triple": TRIPLE, "mcpu": "futurecpu", "features": ["SSE2", "NOT_A_REAL_FEATURE", "ZZZ_EXT"]}
    with pytest.raises(ArtifactError) as e:
        check_host_cpu(section, "dir/model.llmc")
    msg = str(e.value)
    assert "dir/model.llmc" in msg and "futurecpu" in msg
    assert "NOT_A_REAL_FEATURE, ZZZ_EXT" in msg and "SSE2" not in msg.split("use ")[1].split(",")[0]
    assert "--target llvm" in msg


def test_other_architecture_is_refused():
    other = "aarch64-unknown-linux-gnu" if "x86_64" in TRIPLE else "x86_64-unknown-linux-gnu"
    with pytest.raises(ArtifactError, match="built for"):
        check_host_cpu({"triple": other, "mcpu": "generic", "features": []}, "m")


@pytest.mark.parametrize("section", [None, [], {"mcpu": "x"}, {"triple": TRIPLE, "mcpu": 3, "features": []},
                                     {"triple": TRIPLE, "mcpu": "x", "features": "AVX2"},
                                     {"triple": TRIPLE, "mcpu": "x", "features": [1, 2]}])
def test_malformed_section_is_an_artifact_error(section):
    with pytest.raises(ArtifactError, match="section 'cpu'"):
        check_host_cpu(section, "m")


def test_runtime_module_imports_numpy_only():
    import ast
    import pathlib

    import llmc.runtime.cpu_features as mod

    tree = ast.parse(pathlib.Path(mod.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert names <= {"__future__", "functools", "platform", "typing", "numpy"}, names
