"""The measurement behind `generation_backend: auto`: vLLM vs transformers on this machine.

`bench/bench_generation.py` measures at length (16 prompts x 4 samples x 256 tokens, best of 2,
both precisions) and records the choice. Where nothing is on record, the first stage that samples
with `auto` runs `run_probe`: the same comparison on fewer prompts (8 prompts x 4 samples x 256 new
tokens, one warm-up and one timed round each, in the precision the machine would use: bf16 where
it is native, else fp32), on the default model, in a subprocess (one in-process vLLM engine per
process; the stage opens its own next). About 2.5 minutes on a 2-core CPU; recorded in the same cache file as the
bench, so it runs once per machine, and `align.hardware.pick_backend` decides from it by the one
rule (vLLM only at >= VLLM_MIN_SPEEDUP x transformers). A probe that fails leaves nothing on
record and says why; the stage then uses the old guess (vLLM where bf16 is native or CUDA).

    python -m align.backend_probe [--model default] [--dtype float32] [--prompts 8] [--n 4] [--max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

# Kitchen questions like the default data's; the bench prefers data/eval_prompts.jsonl when present.
BUILT_IN_PROMPTS = [
    "How do I keep basil fresh?", "What can I make with leftover rice?", "How long do hard-boiled eggs keep?",
    "Give me a quick tomato sauce.", "How do I stop pasta from sticking?", "What goes well with lentils?",
    "How do I dice an onion?", "Can I freeze bread?", "How do I make a simple vinaigrette?",
    "What is a good substitute for butter in baking?", "How do I roast carrots?", "How do I cook quinoa?",
    "How should I store potatoes?", "How do I make scrambled eggs creamy?", "What spices go with chickpeas?",
    "How do I know when salmon is cooked?", "How do I ripen an avocado quickly?", "What can I cook with tofu?",
]
# The stages' own shape (4 samples of up to 256 tokens per prompt), on fewer prompts. Shorter caps
# flatter transformers (it pays for a batch until its longest sample ends): 8 x 2 x 128 measured
# vLLM at 1.5x here, 8 x 4 x 256 at 2.1x, the full bench 2.9x, the DPO stage's sampling 5.5x.
PROBE_PROMPTS, PROBE_SAMPLES, PROBE_NEW_TOKENS = 8, 4, 256
PROBE_TIMEOUT_S = 600
PROBE_MODEL = "default"


def built_in_conversations(count: int) -> list[list[dict]]:
    prompts = [[{"role": "user", "content": text}] for text in BUILT_IN_PROMPTS]
    while len(prompts) < count:
        prompts = prompts + prompts
    return prompts[:count]


def timed_run(generator, conversations, settings) -> tuple[float, int]:
    started = time.perf_counter()
    results = generator.generate(conversations, settings)
    seconds = time.perf_counter() - started
    return seconds, sum(len(sample.token_ids) for samples in results for sample in samples)


def measure(generators: dict, conversations, settings, repeats: int, say=print) -> dict[str, float]:
    """Best-of tokens/s per generator after one short warm-up each, alternating the generators
    round by round, so a machine whose load changes slows them alike."""
    from align.generation import SamplingSettings

    warm = SamplingSettings(n=1, temperature=1.0, max_new_tokens=8, seed=0)
    for generator in generators.values():
        generator.generate(conversations[:2], warm)
    best = {name: 0.0 for name in generators}
    for round_index in range(repeats):
        for name, generator in generators.items():
            seconds, tokens = timed_run(generator, conversations, replace(settings, seed=round_index))
            best[name] = max(best[name], tokens / seconds)
            say(f"  round {round_index + 1}: {name:12s} {tokens:5d} tokens in {seconds:6.1f} s = "
                f"{tokens / seconds:6.0f} tok/s")
    return best


def probe_speeds(model_path: str, dtype: str, prompts: int = PROBE_PROMPTS, n: int = PROBE_SAMPLES,
                 max_new_tokens: int = PROBE_NEW_TOKENS) -> dict[str, float]:
    """{"hf <dtype>": tokens/s, "vllm <dtype>": tokens/s} measured in this process."""
    from align.generation import SamplingSettings, create_generator

    conversations = built_in_conversations(prompts)
    settings = SamplingSettings(n=n, temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens)
    contenders = {f"hf {dtype}": create_generator(model_path, "hf", dtype, batch_size=len(conversations), quiet=True),
                  f"vllm {dtype}": create_generator(model_path, "vllm", dtype, kv_cache_gib=0.5, quiet=True)}
    try:
        return measure(contenders, conversations, settings, repeats=1,
                       say=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        for generator in contenders.values():
            generator.close()


def run_probe(say=None, model: str = PROBE_MODEL) -> dict | None:
    """Measure in a subprocess and record the choice (align.hardware.record_backend_choice);
    the record, or None when the probe failed (said in one line)."""
    from align import hardware

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    dtype = "bfloat16" if hardware.native_bf16() else "float32"
    say(f"[generation] no backend measurement on record for {hardware.machine_key()}: probing vllm vs transformers "
        f"once ({PROBE_PROMPTS} prompts x {PROBE_SAMPLES} x {PROBE_NEW_TOKENS} tokens, {dtype}, ~2-3 min; "
        f"recorded in {hardware.choice_path()}; bench/bench_generation.py measures at length)")
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "align.backend_probe", "--dtype", dtype, "--model", model],
                              capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        say(f"[generation] the backend probe took over {PROBE_TIMEOUT_S} s; nothing recorded")
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        cause = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        say(f"[generation] the backend probe failed (exit {done.returncode}: {cause}); nothing recorded")
        return None
    speeds = json.loads(lines[-1])
    backend, chosen_dtype, _ = hardware.pick_backend(speeds)
    hardware.record_backend_choice(backend, chosen_dtype, {name: round(value, 1) for name, value in speeds.items()},
                                   model, source="probe")
    figures = ", ".join(f"{name} {value:.0f}" for name, value in speeds.items())
    say(f"[generation] probe done in {time.perf_counter() - started:.0f} s: tokens/s {figures} -> {backend}")
    return hardware.recorded_backend_choice()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=PROBE_MODEL)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("--prompts", type=int, default=PROBE_PROMPTS)
    parser.add_argument("--n", type=int, default=PROBE_SAMPLES)
    parser.add_argument("--max-new-tokens", type=int, default=PROBE_NEW_TOKENS)
    args = parser.parse_args()
    from align import models
    from align.console import quiet_libraries

    quiet_libraries()
    speeds = probe_speeds(models.resolve_model(args.model), args.dtype, args.prompts, args.n, args.max_new_tokens)
    print(json.dumps(speeds), flush=True)  # the last line of stdout: what run_probe reads


if __name__ == "__main__":
    main()
