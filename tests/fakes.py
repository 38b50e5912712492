"""Fake finished stages for tests: real stage outputs (written through
`align.runs.stage_output`, manifests and all) holding tiny random models, and a
compare run on them. Plain functions; the tests that need them import them.

`sft` is the tiny random Llama, `dpo` the same weights moved by a small seeded
perturbation (a nearby model, as alignment produces), `reward` a tiny random
sequence classifier with one label. Real generation, real scoring, real forward
passes; only the weights are random.
"""

from __future__ import annotations

from pathlib import Path

from align import runs
from tests.conftest import run_stage


def make_policy_stage(run: str, stage: str, source: Path, noise: float = 0.0, seed: int = 0) -> Path:
    """A finished `stage` whose model is `source`, optionally perturbed by seeded Gaussian noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with runs.stage_output(run, stage, {"built_by": "tests/fakes.py", "noise": noise}, seed) as out:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        if noise:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * noise)
        model.save_pretrained(out.model_dir)
        AutoTokenizer.from_pretrained(source).save_pretrained(out.model_dir)
    return out.path


def make_reward_stage(run: str, source: Path, gate_passed: bool = True) -> Path:
    """A finished `reward` stage holding a tiny random 1-label sequence classifier."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(source))
    config = AutoConfig.from_pretrained(source, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(7)
    with runs.stage_output(run, "reward", {"built_by": "tests/fakes.py"}, 7) as out:
        AutoModelForSequenceClassification.from_config(config).save_pretrained(out.model_dir)
        AutoTokenizer.from_pretrained(source).save_pretrained(out.model_dir)
        out.metrics["gate_passed"] = gate_passed
    return out.path


def compare_args(prompts: Path, *extra: str) -> list[str]:
    """Small, fast compare settings: hf backend, short responses, few resamples."""
    return ["--prompts_file", str(prompts), "--generation_backend", "hf", "--max_new_tokens", "12",
            "--samples_per_prompt", "2", "--bootstrap_resamples", "400", "--kl_batch_size", "16", *extra]


def make_compare_run(run: str, tiny_model_dir: Path, prompts: Path, *extra: str):
    """sft, dpo and reward stages of `run`, then `python -m stages.compare` on them; returns the process."""
    make_policy_stage(run, "sft", tiny_model_dir)
    make_policy_stage(run, "dpo", tiny_model_dir, noise=0.02, seed=1)
    make_reward_stage(run, tiny_model_dir)
    return run_stage("compare", "--run", run, *compare_args(prompts, *extra))
