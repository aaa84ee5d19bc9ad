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


def test_bf16_products_follow_the_units_and_attention_torchs_level_too(tmp_path,
                                                                        monkeypatch):
    """Products go to oneDNN, which reads the CPU itself; torch's bf16 flash attention
    with AMX tiles needs torch at its AVX512 level."""
    zen3, zen4, amx = (cpu_features.read(_cpuinfo(tmp_path, flags)) for flags in (
        ZEN3_FLAGS, ZEN4_FLAGS, ZEN4_FLAGS + " amx_tile amx_bf16 amx_int8"))
    for level in ("AVX512", "AVX2", "DEFAULT"):
        monkeypatch.setattr(cpu_features, "torch_capability", lambda level=level: level)
        assert [cpu_features.native_bf16_matmul(f) for f in (zen3, zen4, amx)] == [
            False, True, True]
        assert [cpu_features.native_bf16_attention(f) for f in (zen3, zen4, amx)] == [
            False, True, level == "AVX512"]


def test_prefill_attention_stays_float32_where_bf16_attention_cannot_run(monkeypatch):
    import torch

    monkeypatch.setenv(cpu_features.PREFILL_ENV, "bfloat16")
    monkeypatch.setattr(cpu_features, "_native_bf16_attention_here", lambda: False)
    assert cpu_features.prefill_dtype() == torch.bfloat16
    assert cpu_features.prefill_attention_dtype() == torch.float32
    monkeypatch.setattr(cpu_features, "_native_bf16_attention_here", lambda: True)
    assert cpu_features.prefill_attention_dtype() == torch.bfloat16
    monkeypatch.setenv(cpu_features.PREFILL_ENV, "float32")
    assert cpu_features.prefill_attention_dtype() == torch.float32
