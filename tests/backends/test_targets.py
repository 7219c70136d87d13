"""backends/targets.py: CPU target names, the portable baseline and the `cpu` manifest section."""
import platform

import pytest

from llmc.backends.targets import PORTABLE_CPU, TargetSpec, host_arch, parse_target
from llmc.errors import TargetError
from llmc.runtime.cpu_features import check_host_cpu, host_cpu_features

X86 = host_arch() == "x86_64"


def test_plain_llvm_is_the_portable_baseline():
    for name in ("llvm", "cpu", " llvm ", {"kind": "llvm"}):
        spec = parse_target(name)
        assert spec == TargetSpec("llvm", "", "cpu") and str(spec) == "llvm"
    t = parse_target("llvm").tvm_target()
    assert t["kind"] == "llvm" and t["mcpu"] == PORTABLE_CPU[host_arch()] and t["num-cores"] >= 1


@pytest.mark.skipif(not X86, reason="x86_64 baseline")
def test_x86_baseline_is_haswell_level():
    sec = parse_target("llvm").cpu_section()
    assert sec["mcpu"] == "x86-64-v3" and sec["triple"].startswith("x86_64")
    assert {"AVX", "AVX2", "FMA3", "BMI", "BMI2", "F16C", "MOVBE", "SSE42"} <= set(sec["features"])
    assert not any(f.startswith("AVX512") for f in sec["features"])
    # spelled out, the baseline is the plain target
    assert parse_target("llvm:x86-64-v3") == parse_target("llvm")


@pytest.mark.skipif(not X86, reason="x86 CPU names")
def test_named_cpu_and_its_features():
    spec = parse_target("llvm:skylake-avx512")
    assert str(spec) == "llvm:skylake-avx512" and spec.tvm_target()["mcpu"] == "skylake-avx512"
    feats = set(spec.cpu_section()["features"])
    assert {"AVX512F", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX2", "FMA3"} <= feats
    assert parse_target({"kind": "cpu", "mcpu": "znver3"}).arch == "znver3"


def test_native_resolves_to_the_host_and_runs_here():
    spec = parse_target("llvm:native")
    assert spec.kind == "llvm" and spec.arch != "native"
    sec = spec.cpu_section()
    # extensions LLVM credits the host's CPU name with but this (virtual) processor hides are
    # switched off, so native code runs here, and the check agrees
    assert set(sec["features"]) <= host_cpu_features()
    assert set(parse_target("llvm").cpu_section()["features"]) <= set(sec["features"])
    assert sec["mcpu"] == spec.mcpu
    check_host_cpu(sec, "here")


def test_portable_section_passes_the_host_check_here():
    check_host_cpu(parse_target("llvm").cpu_section(), "here")


@pytest.mark.parametrize("bad", ["llvm:pentium9000", "cpu:skylak", "llvm:not a cpu"])
def test_unknown_cpu_is_a_target_error(bad):
    with pytest.raises(TargetError, match="unknown CPU") as e:
        parse_target(bad)
    assert "llvm:native" in str(e.value)


def test_typo_gets_a_suggestion():
    if not X86:
        pytest.skip("x86 CPU names")
    with pytest.raises(TargetError, match="did you mean .*skylake"):
        parse_target("llvm:skylak")


def test_gpu_targets_have_no_cpu_section():
    assert parse_target("cuda").cpu_section() is None
    assert parse_target("rocm:gfx90a").cpu_section() is None


def test_native_switches_off_what_the_processor_hides(monkeypatch):
    """A VM may hide extensions its CPU model has: llvm:native must not use them."""
    import llmc.runtime.cpu_features as cf

    name = parse_target("llvm:native").mcpu
    full = parse_target(f"llvm:{name}").cpu_section()["features"]
    hidden = full[-1]  # pretend the processor lacks one of them
    monkeypatch.setattr(cf, "host_cpu_features", lambda: frozenset(full) - {hidden})
    spec = parse_target("llvm:native")
    assert spec.mattr and all(m.startswith("-") for m in spec.mattr)
    assert spec.tvm_target()["mattr"] == list(spec.mattr)
    sec = spec.cpu_section()
    assert hidden not in sec["features"] and set(sec["features"]) <= set(full)
