"""CPU features read from /proc/cpuinfo text: the capabilities a machine may run."""
from __future__ import annotations

from colocate import cpu_features

ZEN3_FLAGS = "fpu sse2 avx avx2 fma f16c bmi2"
ZEN4_FLAGS = ZEN3_FLAGS + " avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni"


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    block = f"processor\t: {{n}}\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\n"
    path.write_text(block.format(n=0) + block.format(n=1))
    return path


def test_avx2_only_machine_runs_default_and_avx2(tmp_path):
    features = cpu_features.read(_cpuinfo(tmp_path, ZEN3_FLAGS))
    assert features.model == "AMD EPYC"
    assert features.runnable() == ["default", "avx2"]
    assert not features.has("avx512_bf16")


def test_avx512_machine_runs_all_three(tmp_path):
    features = cpu_features.read(_cpuinfo(tmp_path, ZEN4_FLAGS))
    assert features.runnable() == ["default", "avx2", "avx512"]
    assert features.has("avx512_vnni") and not features.has("amx_tile")


def test_partial_avx512_is_not_runnable(tmp_path):
    """torch's AVX512 kernels need F, BW, VL and DQ together (Knights Landing had only F)."""
    features = cpu_features.read(_cpuinfo(tmp_path, ZEN3_FLAGS + " avx512f"))
    assert "avx512" not in features.runnable()


def test_this_machine_report_names_the_native_capability():
    features = cpu_features.read()
    text = cpu_features.report(features)
    native = cpu_features.torch_capability().lower()
    assert native in features.runnable(), text
    assert native not in cpu_features.other_capabilities(features)
    assert text.startswith("cpu: ") and "avx512_bf16=" in text


def test_missing_cpuinfo_gives_no_flags(tmp_path):
    features = cpu_features.read(tmp_path / "absent")
    assert features.runnable() == ["default"]
