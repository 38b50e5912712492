"""What this machine can do, and the choices that follow from it, made in one place.

- `has_cuda`, `cpu_flags`, `native_bf16`: detected, never assumed. CPUs differ
  between machines (AMX, AVX-512-bf16, AVX2 only); on a CPU without native bf16 a
  bf16 matmul is emulated and ~100x slower than fp32, so bf16 is used only where it
  is native.
- `Precision` (`auto | bf16 | fp32`): the one spelling of every dtype knob
  (`precision` for training autocast, `generation_dtype`, `score_dtype`, ...);
  `use_bf16` and `torch_dtype_name` resolve it.
- `machine_key` and the generation-backend choice for `generation_backend: auto`:
  what `bench/bench_generation.py` measured on this machine (cached in
  `$ALIGN_CACHE/generation-backend.json`); vLLM only where it measured at least
  `VLLM_MIN_SPEEDUP` times transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Literal

from align.errors import AlignError, ConfigError
from align.files import atomic_write_json, cache_dir

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS = ("auto", "bf16", "fp32")
_TORCH_NAMES = {"bf16": "bfloat16", "fp32": "float32", "bfloat16": "bfloat16", "float32": "float32"}
CHOICE_FILE = "generation-backend.json"
# vLLM must be this much faster than transformers to be worth it: an in-process engine
# costs 10-20 s to import and start, a KV cache (1 GiB by default) and a second copy of
# the weights, and an online loop pushes every round's weights into it.
VLLM_MIN_SPEEDUP = 2.0
CPU_FLAGS_OF_INTEREST = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Native bf16 matmul on this CPU: AVX512-BF16 or AMX-BF16."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16() -> bool:
    return has_cuda() or cpu_has_bf16()


def cpu_model() -> str:
    """The CPU's name (`model name` in /proc/cpuinfo; the platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_devices() -> list[str]:
    """The names of the visible CUDA devices (empty without CUDA or without torch)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]


def memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def describe_cpu() -> str:
    """`avx2 avx512f avx512_bf16 amx_bf16`: the flags that decide precision, for reports."""
    flags = cpu_flags()
    present = [flag for flag in CPU_FLAGS_OF_INTEREST if flag in flags]
    return " ".join(present) or "none of " + ", ".join(CPU_FLAGS_OF_INTEREST)


def check_precision(value: str, key: str = "precision") -> str:
    if value not in PRECISIONS:
        raise ConfigError(f"{key}: expected one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def use_bf16(precision: str, native: bool | None = None) -> bool:
    """auto: bf16 on CUDA or a CPU with native bf16, fp32 elsewhere; bf16/fp32 as asked."""
    check_precision(precision)
    if precision == "auto":
        return native_bf16() if native is None else native
    if precision == "bf16":
        warn_if_emulated_bf16()
    return precision == "bf16"


def torch_dtype_name(choice: str, native: bool | None = None) -> str:
    """`auto | bf16 | fp32` (or a torch name) -> "bfloat16" or "float32"."""
    if choice == "auto":
        return "bfloat16" if (native_bf16() if native is None else native) else "float32"
    if choice not in _TORCH_NAMES:
        raise ConfigError(f"dtype: expected one of {', '.join(PRECISIONS)}, got {choice!r}")
    if _TORCH_NAMES[choice] == "bfloat16":
        warn_if_emulated_bf16()
    return _TORCH_NAMES[choice]


@lru_cache(maxsize=1)
def warn_if_emulated_bf16() -> bool:
    """bf16 asked for by name where nothing runs it natively: say once per process what it costs
    (`auto` never picks it there). Returns whether it warned."""
    if native_bf16():
        return False
    from align.console import warn

    warn(f"bf16 was asked for, but this CPU has no native bf16 ({describe_cpu()}): bf16 matmuls are "
         "emulated here, ~100x slower than fp32. Use auto or fp32.")
    return True


# ---------------------------------------------------------------------------
# Generation backend for `generation_backend: auto`.


def machine_key() -> str:
    """What a benchmark's choice is valid for: GPU name, or CPU model and core count."""
    devices = cuda_devices()
    if devices:
        return f"cuda:{devices[0]} x{len(devices)}"
    return f"cpu:{cpu_model()} x{os.cpu_count()}"


def choice_path() -> Path:
    return cache_dir() / CHOICE_FILE


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_backend(tokens_per_s: dict[str, float]) -> tuple[str, str, str]:
    """(backend, dtype, reason) from benchmark speeds named "<backend> <dtype>" (e.g. "vllm bfloat16")."""
    best = {}
    for name, speed in tokens_per_s.items():
        backend, dtype = name.split()
        if backend not in best or speed > best[backend][1]:
            best[backend] = (dtype, speed)
    if "hf" not in best:
        raise AlignError(f"backend benchmark has no transformers figure to compare with: {tokens_per_s}")
    hf_dtype, hf_speed = best["hf"]
    if "vllm" not in best:
        return "hf", hf_dtype, "vllm not measured"
    vllm_dtype, vllm_speed = best["vllm"]
    ratio = vllm_speed / hf_speed
    if ratio >= VLLM_MIN_SPEEDUP:
        return "vllm", vllm_dtype, f"vllm {ratio:.2f}x transformers (>= {VLLM_MIN_SPEEDUP:g}x)"
    return "hf", hf_dtype, f"vllm only {ratio:.2f}x transformers (< {VLLM_MIN_SPEEDUP:g}x: not worth its start-up and memory)"


def record_backend_choice(backend: str, dtype: str, tokens_per_s: dict, model: str, source: str = "bench") -> Path:
    """Remember the fastest backend for this machine: from bench/bench_generation.py (`bench`) or
    the short probe a stage runs when nothing is on record (`probe`, align/backend_probe.py)."""
    path = choice_path()
    choices = json.loads(path.read_text()) if path.is_file() else {}
    choices[machine_key()] = {
        "backend": backend, "dtype": dtype, "tokens_per_s": tokens_per_s, "model": model, "source": source,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return atomic_write_json(path, choices)


def recorded_backend_choice() -> dict | None:
    """What bench/bench_generation.py recorded for this machine (`record_backend_choice`), or None."""
    path = choice_path()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get(machine_key())
    except (json.JSONDecodeError, AttributeError):
        return None


def choose_backend(probe: bool = False) -> tuple[str, str, str]:
    """(backend, dtype, reason) for `generation_backend: auto`: from the measurement on record for
    this machine; with none and `probe`, measured now (align/backend_probe.py, once per machine);
    else the guess below. `make env` asks without probing."""
    measured = recorded_backend_choice()
    if measured is None and probe and vllm_installed():
        from align.backend_probe import run_probe

        measured = run_probe()
    if measured and (measured["backend"] != "vllm" or vllm_installed()):
        speeds = ", ".join(f"{name} {value:.0f}" for name, value in measured.get("tokens_per_s", {}).items())
        by = ("a short probe (align/backend_probe.py)" if measured.get("source") == "probe"
              else "bench/bench_generation.py")
        return measured["backend"], measured.get("dtype", "auto"), (
            f"chosen by {by} on {measured.get('measured_at', '?')} (tokens/s: {speeds}; "
            f"vllm needs >= {VLLM_MIN_SPEEDUP:g}x transformers; {choice_path()})")
    if not vllm_installed():
        return "hf", "auto", "no benchmark on record; vllm is not installed"
    if native_bf16():
        return "vllm", "auto", "no benchmark on record for this machine; default: vllm is installed and bf16 is native"
    return "hf", "auto", "no benchmark on record; no CUDA and no native bf16 on this CPU, where vllm's gain is small"
