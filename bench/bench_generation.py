"""Candidate sampling throughput: vLLM vs transformers `generate`, side by side.

Same model (default: SmolLM2-135M-Instruct), same prompts (data/eval_prompts.jsonl
when present, else a built-in list), same sampling (n samples per prompt,
temperature 1, top_p 0.95, max_new_tokens), in bf16 where the hardware has it
natively and in fp32; best of `--repeats` timed runs each after one warm-up.
Reported: generated tokens/s per configuration and the ratio of the best vLLM
to the best transformers figure. The choice (align.hardware.pick_backend: vLLM
only at >= 2x transformers) is written to the cache
($ALIGN_CACHE/generation-backend.json, keyed by this machine), where
`backend: auto` finds it.

One in-process vLLM engine can live in a process at a time, so the run has one
phase per precision: that precision's vLLM engine and transformers model, timed
alternately round by round, so a busy machine slows both alike.

    python bench/bench_generation.py [--prompts 16] [--n 4] [--max-new-tokens 256] [--repeats 2]
                                     [--dtypes bfloat16 float32] [--model default] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from align import data, models  # noqa: E402
from align.backend_probe import BUILT_IN_PROMPTS, measure  # noqa: E402
from align.generation import SamplingSettings, create_generator  # noqa: E402
from align.hardware import machine_key, native_bf16, pick_backend, record_backend_choice, vllm_installed  # noqa: E402

def load_conversations(count: int) -> tuple[list[list[dict]], str]:
    path = REPO / "data" / "eval_prompts.jsonl"
    if path.is_file():
        prompts = [record["prompt"] for record in data.load_prompts(path)]
        source = str(path.relative_to(REPO))
    else:
        prompts, source = [[{"role": "user", "content": text}] for text in BUILT_IN_PROMPTS], "built-in list"
    while len(prompts) < count:  # repeat when the file is short: the batch size is what we measure
        prompts = prompts + prompts
    return prompts[:count], source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    # the candidates stage's own cap (configs/candidates.yaml): HF pays for every batch until its
    # longest sample ends, vLLM does not, so a short cap flatters HF (64 tokens: 1.85x, see README)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=None,
                        help="precisions to compare (default: bfloat16 and float32 where bf16 is native)")
    parser.add_argument("--no-record", action="store_true", help="do not write the choice for backend: auto")
    args = parser.parse_args()

    started = time.time()
    model_path = models.resolve_model(args.model)
    conversations, source = load_conversations(args.prompts)
    settings = SamplingSettings(n=args.n, temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens)
    dtypes = args.dtypes or (["bfloat16", "float32"] if native_bf16() else ["float32"])
    print(f"[bench] {args.model}: {len(conversations)} prompts ({source}) x {args.n} samples x "
          f"{args.max_new_tokens} new tokens, sampling; best of {args.repeats}; {machine_key()}", flush=True)

    speeds: dict[str, float] = {}
    for dtype in dtypes:
        print(f"[bench] phase {dtype}: transformers generate vs vLLM in-process engine", flush=True)
        contenders = {f"hf {dtype}": create_generator(model_path, "hf", dtype, batch_size=len(conversations),
                                                      quiet=True)}
        if vllm_installed():
            contenders[f"vllm {dtype}"] = create_generator(model_path, "vllm", dtype, quiet=True)
        try:
            speeds.update(measure(contenders, conversations, settings, args.repeats))
        finally:
            for generator in contenders.values():
                generator.close()
    if not vllm_installed():
        print("[bench] vllm is not installed: transformers only", flush=True)

    print("\n[bench] tokens/s (best of runs):")
    for name, value in sorted(speeds.items(), key=lambda item: -item[1]):
        print(f"  {name:16s} {value:7.0f}")
    best_hf = max(value for name, value in speeds.items() if name.startswith("hf"))
    vllm_speeds = [value for name, value in speeds.items() if name.startswith("vllm")]
    for dtype in dtypes:
        if f"vllm {dtype}" in speeds:
            print(f"  ratio vLLM / transformers, {dtype}: {speeds[f'vllm {dtype}'] / speeds[f'hf {dtype}']:.2f}x")
    if vllm_speeds:
        print(f"  ratio best vLLM / best transformers: {max(vllm_speeds) / best_hf:.2f}x")
    backend, dtype, reason = pick_backend(speeds)
    print(f"[bench] backend: auto -> {backend} ({dtype}): {reason}")
    if not args.no_record:
        path = record_backend_choice(backend, dtype, {name: round(value, 1) for name, value in speeds.items()},
                                     args.model)
        print(f"[bench] written to {path}")
    print(f"[bench] done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
