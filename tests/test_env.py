"""`make env` (stages/env.py, align/env_report.py): a paste-able report of the machine and install."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.env_report import REPORTED_CPU_FLAGS, cpu_flags_line
from tests.conftest import assert_ok, run_stage

FIELDS = ("Platform", "Python", "torch version", "transformers version", "trl version", "peft version",
          "datasets version", "accelerate version", "vllm version", "argilla version", "align version",
          "align git commit", "CPU", "CPU flags", "CPU cores", "Memory", "CUDA devices", "Native bf16", "Matmul peak", "Allocator",
          "Generation backend (auto)")


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_flags_line_lists_present_flags_then_absent_ones():
    assert cpu_flags_line(frozenset({"avx2", "amx_bf16", "sse4_2"})) == (
        "avx2 amx_bf16 (absent: fma avx512f avx512_vnni avx_vnni avx512_bf16 amx_tile amx_int8)")
    assert cpu_flags_line(frozenset()).startswith("none (absent: avx2 ")
    assert cpu_flags_line(frozenset(REPORTED_CPU_FLAGS)) == " ".join(REPORTED_CPU_FLAGS)


@pytest.mark.slow
def test_env_prints_every_field_and_the_cpus_real_flags():
    result = run_stage("env", timeout=300)
    assert_ok(result)
    assert result.stdout.startswith("Copy-paste the following information when reporting an issue:")
    lines = dict(line[2:].split(": ", 1) for line in result.stdout.splitlines() if line.startswith("- "))
    for name in FIELDS:
        assert lines.get(name), (name, result.stdout)
    present = lines["CPU flags"].split(" (absent: ")[0].split()
    assert set(present) - {"none"} == cpuinfo_flags() & set(REPORTED_CPU_FLAGS)
    assert lines["Allocator"].split()[0] in ("tcmalloc", "jemalloc", "glibc")
    assert lines["Generation backend (auto)"].split()[0] in ("vllm", "hf")
    assert "token" in lines["Hugging Face Hub"] and "hf_" not in lines["Hugging Face Hub"]  # never the token itself
