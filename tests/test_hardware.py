"""bf16 only where it is native: the precision decision for the three CPU kinds seen on these
machines, applied to every dtype knob of every stage's shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align import hardware

# /proc/cpuinfo flags of the CPUs this project has run on (the ones that matter, plus neighbours)
CPU_KINDS = {
    # 2-core Intel Xeon, AMX: bf16 matmul ~6.5x fp32
    "amx": "fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile "
           "amx_int8",
    # 2-core AMD EPYC, AVX-512 with bf16 dot products, no AMX: bf16 matmul 409 vs fp32 155 GFLOP/s (2026-12-03)
    "avx512_bf16": "fpu sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512ifma "
                   "avx512vbmi",
    # 2-core AMD EPYC, AVX2 only: bf16 emulated, ~1 GFLOP/s against ~95 fp32
    "avx2": "fpu sse4_2 avx avx2 fma f16c",
}
NATIVE = {"amx": True, "avx512_bf16": True, "avx2": False}
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# every dtype knob of the stage configs, and how the stage resolves it
TRAINING_KEY = "precision"
DTYPE_KEYS = ("generation_dtype", "score_dtype", "kl_dtype")


@pytest.fixture(params=sorted(CPU_KINDS))
def cpu_kind(request, monkeypatch):
    """This process sees the CPU kind's flags and no CUDA."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(CPU_KINDS[request.param].split()))
    monkeypatch.setattr(hardware, "has_cuda", lambda: False)
    hardware.warn_if_emulated_bf16.cache_clear()
    yield request.param
    hardware.warn_if_emulated_bf16.cache_clear()


def resolved_dtypes(config: dict) -> dict[str, str]:
    """Each dtype knob of a stage config as the stage resolves it ("bfloat16" | "float32")."""
    resolved = {}
    bf16 = hardware.use_bf16(config[TRAINING_KEY]) if TRAINING_KEY in config else None
    if bf16 is not None:
        resolved[TRAINING_KEY] = "bfloat16" if bf16 else "float32"
    for key in DTYPE_KEYS:
        if key in config:  # online stages: score_dtype auto follows the training precision
            native = bf16 if key == "score_dtype" else None
            resolved[key] = hardware.torch_dtype_name(config[key], native=native)
    return resolved


def test_native_bf16_is_read_from_the_flags(cpu_kind):
    assert hardware.cpu_has_bf16() is NATIVE[cpu_kind]
    assert hardware.native_bf16() is NATIVE[cpu_kind]
    assert hardware.use_bf16("auto") is NATIVE[cpu_kind]
    assert hardware.torch_dtype_name("auto") == ("bfloat16" if NATIVE[cpu_kind] else "float32")
    assert hardware.use_bf16("fp32") is False and hardware.torch_dtype_name("fp32") == "float32"


def test_no_shipped_config_puts_anything_in_bf16_where_it_is_emulated(cpu_kind):
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert len(configs) >= 7
    seen = 0
    for path in configs:
        resolved = resolved_dtypes(yaml.safe_load(path.read_text()) or {})
        seen += len(resolved)
        if not NATIVE[cpu_kind]:
            assert set(resolved.values()) <= {"float32"}, (path.name, resolved)
        elif TRAINING_KEY in resolved:  # training autocast and sampling take the fast native path
            assert resolved[TRAINING_KEY] == "bfloat16", (path.name, resolved)
            if "generation_dtype" in resolved:
                assert resolved["generation_dtype"] == "bfloat16", (path.name, resolved)
    assert seen >= 15  # precision, generation, scoring and KL knobs of sft, reward, dpo, ppo, rloo, candidates, compare


def test_bf16_asked_for_by_name_where_emulated_warns_once(cpu_kind, capsys):
    assert hardware.use_bf16("bf16") is True  # the user's choice stands
    assert hardware.torch_dtype_name("bf16") == "bfloat16"
    warnings = capsys.readouterr().err.count("no native bf16")
    assert warnings == (0 if NATIVE[cpu_kind] else 1)
