"""What a stage computed, and how much of this machine's peak it used.

Model FLOPs, the usual estimate (Kaplan et al. 2020; PaLM's model FLOPs utilisation), per
real token, from the sizes of the model (`Sizes`):
    forward         2 F           F = the parameters a forward multiplies with; at a position
                                  whose logits nobody needs (a prompt token in generation or in
                                  a log-prob pass: `logits_to_keep`) less 2 H, the output head
    training        2 F + 2 B + 2 T
                                  forward; backward 2B for the activation gradients through the
                                  B parameters from the lowest trainable layer up (LoRA in the
                                  top 8 layers stops there); 2T for the weight gradients of the
                                  T trainable parameters (6F for full fine-tuning)
An input embedding is only looked up (and its gradient is a scatter): it counts where it is
also the output projection (a tied causal LM), not in a reward model or critic.
Attention's own term (2 x layers x context x width per token) is left out: at these
lengths (< 512 tokens) it is under 5% of 2F for SmolLM2-135M. Only real tokens count,
never padding: padding is waste, not work, so the fraction of peak says how much of the
machine the useful work used. Where a trainer's batches are counted too (`count_positions`,
from `align.training.counted`), a phase also reports its padding: positions computed per real
token of those same batches, less one (+41% = 1.41 positions per real token); other passes in the
phase (DPO's precomputed reference log-probs) leave the figure alone. Several processes: each
counts its own share.

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from align.files import atomic_write_json, cache_dir

PEAK_FILE = "matmul-peak.json"
PEAK_SIZE = 2048


@dataclass(frozen=True)
class Sizes:
    """What one token costs a model (see the module docstring)."""

    forward: int  # F: parameters multiplied with at a position whose logits are computed
    head: int  # H: of which the output projection
    backward: int  # B: parameters the activation gradients pass through
    trainable: int  # T: parameters with a weight gradient made by a matmul


def forward_flops(sizes: Sizes, tokens: int, headless_tokens: int = 0) -> float:
    """2F per token, less 2H for each of `headless_tokens` (positions whose logits are not computed)."""
    return 2.0 * sizes.forward * tokens - 2.0 * sizes.head * headless_tokens


def training_flops(sizes: Sizes, tokens: int, headless_tokens: int = 0) -> float:
    """(2F + 2B + 2T) per token; the head left out of forward and backward where no logits are kept."""
    return (2.0 * (sizes.forward + sizes.backward + sizes.trainable) * tokens
            - 4.0 * sizes.head * headless_tokens)


class Ledger:
    """FLOPs and real tokens per phase; the open phase gets what is counted."""

    def __init__(self):
        self.flops: dict[str, float] = defaultdict(float)
        self.tokens: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.positions: dict[str, int] = defaultdict(int)  # padded batch positions, where counted
        self.positioned_tokens: dict[str, int] = defaultdict(int)  # the real tokens of those same batches
        self.open: list[str] = []

    def add(self, flops: float, tokens: int) -> None:
        name = self.open[-1] if self.open else "other"
        self.flops[name] += flops
        self.tokens[name] += tokens

    def add_positions(self, positions: int, tokens: int) -> None:
        name = self.open[-1] if self.open else "other"
        self.positions[name] += positions
        self.positioned_tokens[name] += tokens

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


def count_forward(sizes: Sizes, tokens: int, headless_tokens: int = 0) -> None:
    LEDGER.add(forward_flops(sizes, tokens, headless_tokens), tokens)


def count_training(sizes: Sizes, tokens: int, headless_tokens: int = 0) -> None:
    LEDGER.add(training_flops(sizes, tokens, headless_tokens), tokens)


def count_positions(positions: int, tokens: int) -> None:
    """Batch positions a trainer computed (rows x padded width), real tokens and padding alike, and the
    real tokens among them: the phase's padding compares the two, whatever else the phase counted."""
    LEDGER.add_positions(positions, tokens)


def sizes(model) -> Sizes:
    """A torch model's `Sizes` (PEFT-wrapped or not), from its parameters in registration order
    (embedding, layers bottom to top, norm, head): the backward runs from the first trainable one up."""
    parameters = list(model.parameters())
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    looked_up = getattr(embedding, "weight", None)
    head = getattr(output, "weight", None)
    tied = looked_up is not None and head is looked_up
    if tied:
        looked_up = None  # the tied tensor is the output projection: a matmul per token

    def matmul(chosen) -> int:
        return sum(p.numel() for p in chosen if p is not looked_up)

    first = next((index for index, p in enumerate(parameters) if p.requires_grad), None)
    backward = 0 if first is None else matmul(parameters[first:]) + (head.numel() if tied and first > 0 else 0)
    return Sizes(forward=matmul(parameters), head=0 if head is None else head.numel(), backward=backward,
                 trainable=matmul(p for p in parameters if p.requires_grad))


def checkpoint_sizes(model_path: str | Path) -> Sizes | None:
    """`sizes` of the causal LM in a Hugging Face folder, from its config alone (built on the meta
    device: no weights read); None where there is no such folder (a hub id offline)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(model_path) / "config.json").is_file():
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_path)))
    model.requires_grad_(False)
    return sizes(model)


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
           ledger: Ledger | None = None, peaks: dict[str, float] | None = None, order: tuple[str, ...] = ()) -> dict:
    """Per phase with FLOPs counted: {flops, tokens, seconds, flops_per_s, dtype, peak_fraction}.

    `dtype`: what the phases ran in ("bfloat16" | "float32"), `phase_dtypes` the exceptions (e.g. a
    reward model scored in fp32 by a bf16 stage); the fraction is of the measured matmul peak in
    that dtype (`peaks`, FLOP/s per dtype: measured here unless given). `seconds`: the stage's
    own phase times (default: the ledger's); `order`: the stage's phase order (default: first use).
    "total" sums every phase, its fraction against the stage dtype's peak."""
    ledger = LEDGER if ledger is None else ledger
    seconds = dict(ledger.seconds) if seconds is None else seconds
    phase_dtypes = phase_dtypes or {}
    peaks = dict(peaks or {})

    def peak(name: str) -> float:
        if name not in peaks:
            peaks[name] = matmul_peak(name)
        return peaks[name]

    phases = {}
    named = sorted(ledger.flops, key=lambda name: order.index(name) if name in order else len(order))
    for name in named:
        flops = ledger.flops[name]
        kind = phase_dtypes.get(name, dtype)
        phases[name] = _row(flops, ledger.tokens[name], seconds.get(name, 0.0), kind, peak(kind),
                            ledger.positions.get(name), ledger.positioned_tokens.get(name))
    if len(phases) > 1:
        phases["total"] = _row(sum(ledger.flops.values()), sum(ledger.tokens.values()),
                               sum(seconds.get(name, 0.0) for name in ledger.flops), dtype, peak(dtype))
    return {"dtype": dtype, "peak_flops_per_s": {kind: peaks[kind] for kind in sorted(peaks)}, "phases": phases}


def _row(flops: float, tokens: int, seconds: float, dtype: str, peak: float, positions: int | None = None,
         positioned_tokens: int | None = None) -> dict:
    rate = flops / seconds if seconds > 0 else None
    row = {"flops": flops, "tokens": tokens, "seconds": round(seconds, 2), "flops_per_s": rate, "dtype": dtype,
           "peak_fraction": rate / peak if rate is not None and peak > 0 else None}
    if positions and positioned_tokens:
        row.update(positions=positions, padding=positions / positioned_tokens - 1.0)
    return row


SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}


def summary_text(cost: dict) -> str:
    """`train 1.23 TFLOP at 8% | score 0.20 TFLOP at 3% (fp32) | total ... of peak (bf16 409, fp32 155
    GFLOP/s)` for a stage's summary line: each phase's model FLOPs and the fraction of this machine's
    matmul peak in its dtype (named where it is not the stage's)."""
    if not cost["phases"]:
        return "none counted here (a server generated)"
    parts = []
    for name, row in cost["phases"].items():
        text = f"{name} {row['flops'] / 1e12:.2f} TFLOP"
        if row["peak_fraction"] is not None:
            text += f" at {row['peak_fraction']:.0%}"
        notes = []
        if row["dtype"] != cost["dtype"]:
            notes.append(SHORT_DTYPE.get(row["dtype"], row["dtype"]))
        if row.get("padding") is not None:
            notes.append(f"{row['padding']:+.0%} padding")
        if notes:
            text += f" ({', '.join(notes)})"
        parts.append(text)
    peaks = ", ".join(f"{SHORT_DTYPE.get(k, k)} {v / 1e9:.0f}" for k, v in cost["peak_flops_per_s"].items())
    return " | ".join(parts) + f" of peak ({peaks} GFLOP/s)"


def peak_line() -> str:
    """`fp32 182, bf16 418 GFLOP/s (matmul-peak.json, 2 cores)` for `make env`, from the record only."""
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
