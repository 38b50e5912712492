"""What a stage computed, and how much of this machine's peak it used.

Model FLOPs, the usual estimate (Kaplan et al. 2020; PaLM's model FLOPs utilisation):
    forward         2 N           per token, N = the parameters the forward multiplies with
    training        4 N + 2 T     per token: forward 2N, backward 2N for the activation
                                  gradients and 2T for the weight gradients of the T
                                  trainable parameters (6N for full fine-tuning, ~4N under LoRA)
An input embedding is only looked up: it counts where it is also the output projection
(a tied causal LM), not in a reward model or critic (`matmul_parameters`).
Attention's own term (2 x layers x context x width per token) is left out: at these
lengths (< 512 tokens) it is under 5% of 2N for SmolLM2-135M. Only real tokens count,
never padding: padding is waste, not work, so the fraction of peak says how much of the
machine the useful work used.

Peak: a 2048 x 2048 matmul in the dtype the phase ran in, per machine, thread count and
dtype: the best timing on record in $ALIGN_CACHE/matmul-peak.json, to which every report
adds one more (~0.5 s per dtype) - a peak measured while other work shared the cores is
low, and the record heals (`make env` shows it).

Counting: the places that run a model (generation, reward scoring, log-prob passes, the
trainers' token counts) call `count_forward` / `count_training`; the FLOPs go to the phase
open at the time (`phase`, which `align.online.PhaseTimer` opens for its phases), or to
"other". One ledger per process, like a profiler: a stage reads it at the end (`report`).

Written by hand: no library in the stack counts model FLOPs per phase on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from align.files import atomic_write_json, cache_dir

PEAK_FILE = "matmul-peak.json"
PEAK_SIZE = 2048


def forward_flops(parameters: int, tokens: int) -> float:
    """2N FLOPs per token for one forward pass."""
    return 2.0 * parameters * tokens


def training_flops(parameters: int, trainable: int, tokens: int) -> float:
    """(4N + 2T) FLOPs per token for forward + backward with T trainable parameters."""
    return (4.0 * parameters + 2.0 * trainable) * tokens


class Ledger:
    """FLOPs and real tokens per phase; the open phase gets what is counted."""

    def __init__(self):
        self.flops: dict[str, float] = defaultdict(float)
        self.tokens: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.open: list[str] = []

    def add(self, flops: float, tokens: int) -> None:
        name = self.open[-1] if self.open else "other"
        self.flops[name] += flops
        self.tokens[name] += tokens

    @contextlib.contextmanager
    def phase(self, name: str):
        """Count into `name` while inside; also times it (a nested phase counts for itself only)."""
        self.open.append(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.open.pop()


LEDGER = Ledger()


def phase(name: str):
    return LEDGER.phase(name)


def count_forward(parameters: int, tokens: int) -> None:
    LEDGER.add(forward_flops(parameters, tokens), tokens)


def count_training(parameters: int, trainable: int, tokens: int) -> None:
    LEDGER.add(training_flops(parameters, trainable, tokens), tokens)


def matmul_parameters(model) -> int:
    """The parameters a forward pass multiplies with (2 FLOPs each per token): all of them, less an
    input embedding that is only looked up - kept where the same tensor is also the output
    projection (a tied causal LM's lm_head). A reward model or critic (sequence classifier) has no
    vocabulary projection: its 28M-parameter embedding (SmolLM2) costs nothing per token."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None:
        return total
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is embedding.weight:
        return total
    return total - embedding.weight.numel()


def checkpoint_parameters(model_path: str | Path) -> int | None:
    """`matmul_parameters` of the causal LM in a Hugging Face folder, from its config alone (built on
    the meta device: no weights read); None where there is no such folder (a hub id offline)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(model_path) / "config.json").is_file():
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_path)))
    return matmul_parameters(model)


# ---------------------------------------------------------------------------
# This machine's peak


def _peak_key(dtype: str) -> str:
    import torch

    from align.hardware import machine_key

    return f"{machine_key()} threads={torch.get_num_threads()} {dtype}"


def measure_matmul_peak(dtype: str, size: int = PEAK_SIZE, seconds: float = 1.5) -> float:
    """FLOP/s of a size x size matmul in `dtype` ("float32" | "bfloat16"), best of repeated timings."""
    import torch

    torch_dtype = getattr(torch, dtype)
    a = torch.randn(size, size).to(torch_dtype)
    b = torch.randn(size, size).to(torch_dtype)
    a @ b  # warm-up: kernel selection, page faults
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def matmul_peak(dtype: str, seconds: float = 0.5) -> float:
    """This machine's matmul FLOP/s in `dtype`: the best measurement on record, after one more short
    one now. The machine is shared: a measurement taken while other work ran is low, and a low peak
    would overstate every fraction, so each call measures again and the record keeps the best."""
    path = cache_dir() / PEAK_FILE
    key = _peak_key(dtype)
    try:
        cached = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        cached = {}
    flops_per_s = measure_matmul_peak(dtype, seconds=seconds)
    if key in cached and float(cached[key]["flops_per_s"]) >= flops_per_s:
        return float(cached[key]["flops_per_s"])
    cached[key] = {"flops_per_s": flops_per_s, "size": PEAK_SIZE,
                   "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_json(path, cached)
    return flops_per_s


def report(dtype: str, seconds: dict[str, float] | None = None, phase_dtypes: dict[str, str] | None = None,
           ledger: Ledger | None = None, peaks: dict[str, float] | None = None) -> dict:
    """Per phase with FLOPs counted: {flops, tokens, seconds, flops_per_s, dtype, peak_fraction}.

    `dtype`: what the phases ran in ("bfloat16" | "float32"), `phase_dtypes` the exceptions (e.g. a
    reward model scored in fp32 by a bf16 stage); the fraction is of the measured matmul peak in
    that dtype (`peaks`, FLOP/s per dtype: measured here unless given). `seconds`: the stage's
    own phase times (default: the ledger's). "total" sums every phase, its fraction against the
    stage dtype's peak."""
    ledger = LEDGER if ledger is None else ledger
    seconds = dict(ledger.seconds) if seconds is None else seconds
    phase_dtypes = phase_dtypes or {}
    peaks = dict(peaks or {})

    def peak(name: str) -> float:
        if name not in peaks:
            peaks[name] = matmul_peak(name)
        return peaks[name]

    phases = {}
    for name, flops in ledger.flops.items():
        kind = phase_dtypes.get(name, dtype)
        phases[name] = _row(flops, ledger.tokens[name], seconds.get(name, 0.0), kind, peak(kind))
    if len(phases) > 1:
        phases["total"] = _row(sum(ledger.flops.values()), sum(ledger.tokens.values()),
                               sum(seconds.get(name, 0.0) for name in ledger.flops), dtype, peak(dtype))
    return {"dtype": dtype, "peak_flops_per_s": {kind: peaks[kind] for kind in sorted(peaks)}, "phases": phases}


def _row(flops: float, tokens: int, seconds: float, dtype: str, peak: float) -> dict:
    rate = flops / seconds if seconds > 0 else None
    return {"flops": flops, "tokens": tokens, "seconds": round(seconds, 2), "flops_per_s": rate, "dtype": dtype,
            "peak_fraction": rate / peak if rate is not None and peak > 0 else None}


SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}


def summary_text(cost: dict) -> str:
    """`train 1.23 TFLOP at 8% | score 0.20 TFLOP at 3% (fp32) | total ... of peak (bf16 409, fp32 155
    GFLOP/s)` for a stage's summary line: each phase's model FLOPs and the fraction of this machine's
    matmul peak in its dtype (named where it is not the stage's)."""
    parts = []
    for name, row in cost["phases"].items():
        text = f"{name} {row['flops'] / 1e12:.2f} TFLOP"
        if row["peak_fraction"] is not None:
            text += f" at {row['peak_fraction']:.0%}"
        if row["dtype"] != cost["dtype"]:
            text += f" ({SHORT_DTYPE.get(row['dtype'], row['dtype'])})"
        parts.append(text)
    peaks = ", ".join(f"{SHORT_DTYPE.get(k, k)} {v / 1e9:.0f}" for k, v in cost["peak_flops_per_s"].items())
    return " | ".join(parts) + f" of peak ({peaks} GFLOP/s)"


def peak_line() -> str:
    """`matmul peak fp32 155, bf16 409 GFLOP/s (measured)` for `make env`, from the cache only."""
    path = cache_dir() / PEAK_FILE
    try:
        cached = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        cached = {}
    found = []
    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        row = cached.get(_peak_key(dtype))
        if row:
            found.append(f"{short} {row['flops_per_s'] / 1e9:.0f}")
    if not found:
        return f"not measured yet (the first stage measures it; cached in {path})"
    return ", ".join(found) + f" GFLOP/s ({PEAK_FILE}, {os.cpu_count()} cores)"
