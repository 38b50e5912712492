"""DPO step time and peak memory: the LoRA adapter as reference vs a separate reference copy.

Side by side in one run, on the default model (SmolLM2-135M-Instruct) and the example
project's preference pairs, four set-ups of TRL's DPOTrainer:

    lora            LoRA; the reference is the same model with the adapter disabled
    lora+precompute LoRA; reference log-probs computed once before training
    full            full fine-tuning; the reference is a second, frozen copy (`ref_model`)
    full+precompute full fine-tuning; reference log-probs computed once (the copy stays loaded)

Each set-up runs in its own process, so peak RSS (ru_maxrss) is that set-up's own. Step
time is the median over the timed steps (the first step is a warm-up and is left out).
The set-ups are interleaved over `--repeats` passes, so a machine whose load changes
hits them alike; compare the ratios, not the absolute seconds.

    .venv/bin/python bench/bench_dpo.py [--steps 6] [--batch 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUPS = ("lora", "lora+precompute", "full", "full+precompute")


def child(setup: str, steps: int, batch: int, max_length: int, ranked: str) -> dict:
    """One set-up in this process; returns its numbers."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from align import data, dpo_rounds, hardware, models, preferences, training

    pairs, _ = preferences.ranked_to_pairs(data.load_ranked(ranked))
    pairs = pairs[: steps * batch]
    path = models.resolve_model("default")
    tokenizer = models.load_tokenizer(path)
    model = models.load_causal_lm(path)
    lora = setup.startswith("lora")
    reference = None if lora else models.load_causal_lm(path).eval()
    rss_loaded = _rss_mib()

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(
            output_dir=scratch, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
            max_length=max_length, precompute_ref_log_probs=setup.endswith("precompute"), logging_steps=steps,
            gradient_checkpointing=False, report_to="none", seed=0, save_strategy="no",
            use_cpu=not hardware.has_cuda(), bf16=False,  # fit_to_hardware picks the precision next
        )
        config = training.fit_to_hardware(config, "auto", Path(scratch))
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]) if lora else None
        started = time.perf_counter()
        trainer = DPOTrainer(model=model, ref_model=reference, args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(dpo_rounds.trainer_examples(pairs)),
                             peft_config=peft_config, callbacks=[StepTimer()])
        setup_s = time.perf_counter() - started
        trainer.train()
    timed = step_times[1:] or step_times
    return {
        "setup": setup, "step_s": statistics.median(timed), "steps_timed": len(timed), "setup_s": setup_s,
        "rss_loaded_mib": rss_loaded, "peak_rss_mib": _peak_rss_mib(), "bf16": config.bf16,
        "trainable_m": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6,
    }


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_child(setup: str, args) -> dict:
    command = [sys.executable, __file__, "--child", setup, "--steps", str(args.steps), "--batch", str(args.batch),
               "--max_length", str(args.max_length), "--ranked", args.ranked]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{setup} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per set-up (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved passes over the set-ups")
    parser.add_argument("--ranked", default=str(REPO / "data" / "ranked.jsonl"))
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.max_length, args.ranked)))
        return

    results: dict[str, list[dict]] = {setup: [] for setup in SETUPS}
    for repeat in range(args.repeats):
        for setup in SETUPS:
            print(f"[bench_dpo] pass {repeat + 1}/{args.repeats}: {setup} ...", flush=True)
            results[setup].append(run_child(setup, args))
    rows = {setup: _combine(runs) for setup, runs in results.items()}
    base = rows["lora"]
    print(f"\nDPO on the default model, batch {args.batch} pairs, {args.steps} steps, bf16 {base['bf16']}; "
          "median step time (first step left out) and peak RSS of the process")
    print(f"{'set-up':<18}{'step s':>9}{'x lora':>8}{'peak RSS MiB':>14}{'x lora':>8}{'setup s':>9}{'trainable M':>13}")
    for setup, row in rows.items():
        print(f"{setup:<18}{row['step_s']:>9.2f}{row['step_s'] / base['step_s']:>8.2f}{row['peak_rss_mib']:>14.0f}"
              f"{row['peak_rss_mib'] / base['peak_rss_mib']:>8.2f}{row['setup_s']:>9.1f}{row['trainable_m']:>13.1f}")
    print()
    print(f"separate reference copy vs adapter-as-reference: step time x{rows['full']['step_s'] / base['step_s']:.2f}, "
          f"peak memory x{rows['full']['peak_rss_mib'] / base['peak_rss_mib']:.2f}")
    print(f"precompute_ref_log_probs, LoRA: step time x{rows['lora+precompute']['step_s'] / base['step_s']:.2f}; "
          f"full: x{rows['full+precompute']['step_s'] / rows['full']['step_s']:.2f}")


def _combine(runs: list[dict]) -> dict:
    combined = dict(runs[0])
    for key in ("step_s", "peak_rss_mib", "setup_s", "rss_loaded_mib"):
        combined[key] = statistics.median(run[key] for run in runs)
    return combined


if __name__ == "__main__":
    main()
