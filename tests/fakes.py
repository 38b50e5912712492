"""Fake finished stages for tests: real stage outputs (written through
`align.runs.stage_output`, manifests and all) holding tiny random models, and a
compare run on them. Plain functions; the tests that need them import them.

`sft` is the tiny random Llama, `dpo` the same weights moved by a small seeded
perturbation (a nearby model, as alignment produces), `reward` a tiny random
sequence classifier with one label. Real generation, real scoring, real forward
passes; only the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

from align import runs
from tests.conftest import TOPICS, assert_ok, build_tiny_model, run_stage, write_jsonl


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


def make_reward_stage(run: str, source: Path, gate_passed: bool = True, num_labels: int = 1) -> Path:
    """A finished `reward` stage holding a tiny random sequence classifier (1 label, as a reward
    model has; `num_labels` 2 makes the classifier a reward model must refuse)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(source))
    config = AutoConfig.from_pretrained(source, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
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


# ---------------------------------------------------------------------------
# The cold-or-dry world of the policy-stage tests (DPO, PPO): a hand-built reward model whose
# score is a known function, and a tiny SFT policy whose samples differ in exactly those tokens.

REWARDED_WORDS = {"cold": 1.0, "dry": -1.0}  # each one token in the SmolLM2 vocabulary
SCALE = 30.0  # ~ +1 score per rewarded token in a ~30-token sequence


def build_token_reward_model(tokenizer_dir, folder, token_values: dict[int, float], scale: float = SCALE) -> None:
    """A 1-layer Llama reward model: score = scale * mean over the sequence of value(token).

    Residual stream (hidden 8): dim 0 carries value(t), dim 1 a constant 10 that keeps
    RMSNorm's scale nearly fixed; attention with zero queries/keys averages dim 0 over the
    causal prefix into dim 2 (values copy dim 0, the output writes dim 2); the MLP is zero;
    the score head reads dim 2 at the last token."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    hidden = 8
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=hidden, max_position_embeddings=2048,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, rms_norm_eps=1e-6,
    )
    model = LlamaForSequenceClassification(config)
    gain = (hidden**0.5) / 10.0  # each RMSNorm maps x to ~ x * sqrt(hidden) / 10 (the constant 10 dominates)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        embed = model.model.embed_tokens.weight
        for token, value in token_values.items():
            embed[token, 0] = value
        embed[:, 1] = 10.0
        layer = model.model.layers[0]
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight[0, 0] = 1.0
        layer.self_attn.o_proj.weight[2, 0] = 1.0
        model.score.weight[0, 2] = scale / gain**2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def rewarded_tokens(tokenizer, words: dict[str, float] = REWARDED_WORDS) -> dict[int, float]:
    values = {}
    for word, value in words.items():
        (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]
        values[token] = value
    return values


def make_reward_run(run: str, tokenizer_dir, words: dict[str, float] = REWARDED_WORDS) -> None:
    """A finished `reward` stage output holding the hand-built model (gate passed)."""
    from align.models import load_tokenizer

    values = rewarded_tokens(load_tokenizer(str(tokenizer_dir)), words)
    with runs.stage_output(run, "reward", {"built_by": "tests/test_dpo.py", "token_values": values}, seed=0) as out:
        build_token_reward_model(tokenizer_dir, out.model_dir, values)
        out.metrics.update(gate_passed=True, gate_reasons=[])


SFT_ARGS = ("--max_steps", "40", "--learning_rate", "0.01", "--per_device_train_batch_size", "8", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--logging_steps", "10", "--precision", "fp32")
def cold_or_dry_data(folder) -> dict:
    """SFT answers are "cold" or "dry" equally often; the human rankings prefer cold."""
    sft = [{"id": f"sft-{i}-{word}", "messages": [
               {"role": "user", "content": f"How should I store {topic}?"},
               {"role": "assistant", "content": word}]}
           for i, topic in enumerate(TOPICS) for word in ("cold", "dry")]
    prompts = [{"prompt_id": f"eval-{i}", "prompt": [{"role": "user", "content": f"How do I keep {topic}?"}],
                "reference": "cold"} for i, topic in enumerate(TOPICS[:8])]
    ranked = [{"prompt_id": f"pref-{i}", "prompt": [{"role": "user", "content": f"How should I store {topic}?"}],
               "responses": [{"text": "cold", "rank": 1}, {"text": "dry", "rank": 2}],
               "annotator": "fixture"} for i, topic in enumerate(TOPICS)]
    return {"sft": write_jsonl(folder / "sft.jsonl", sft), "prompts": write_jsonl(folder / "prompts.jsonl", prompts),
            "ranked": write_jsonl(folder / "ranked.jsonl", ranked)}


def make_cold_dry_run(runs_root, folder, default_model_dir) -> dict:
    """A finished SFT run of the tiny model on the cold-or-dry data, plus the hand-built reward run."""
    import torch
    from transformers import AutoModelForCausalLM

    files = cold_or_dry_data(folder)
    build_tiny_model(folder / "model", default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings.mul_(0.15 / embeddings.std())
    model.save_pretrained(folder / "model")
    run = "cold-dry"
    result = run_stage("sft", "--run", run, "--model_name_or_path", str(folder / "model"), "--train_file",
                       str(files["sft"]), "--eval_file", str(files["prompts"]), *SFT_ARGS)
    assert_ok(result)
    make_reward_run(run, runs_root / run / "sft" / "model")
    return {"run": run, **files}


def read_rows(path) -> list[dict]:
    """The objects of a JSON Lines file a stage wrote."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


