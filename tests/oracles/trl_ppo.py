"""TRL 1.12's PPO as an oracle for align.ppo_math, run in a subprocess.

    PYTHONPATH=<cache>/oracles/trl-1.12.0 python tests/oracles/trl_ppo.py masked-stats IN.pt OUT.pt
    PYTHONPATH=<cache>/oracles/trl-1.12.0 python tests/oracles/trl_ppo.py ppo-update IN.pt OUT.pt

The overlay shadows the venv's TRL 1.16 (which has no PPO), so this file must
run in its own process and imports nothing from align. tests/test_ppo_oracle.py
writes IN.pt, runs this, and compares OUT.pt with our functions.

masked-stats: TRL's masked_mean / masked_var / masked_whiten on the given tensors.

ppo-update: one full `PPOTrainer.train()` update per config, on fixed inputs:
  - `batch_generation` returns the preset responses of the queries it is given
    (full length, no eos, no pad) and, as its logits, a policy forward at those
    positions divided by TRL's temperature (what sampling would have returned);
  - `get_reward` returns the preset scores when called with the reward model
    (value-model calls pass through);
  - `numpy.random.permutation` is recorded, so our side can take the same minibatches.
It dumps the state dicts after the update, the log, the rollout order and the permutations.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy
import torch

ORACLE_VERSION = "1.12.0"


def masked_stats(inputs: dict) -> dict:
    from trl.experimental.ppo import ppo_trainer

    results = []
    for case in inputs["cases"]:
        values, mask = case["values"], case["mask"]
        results.append({
            "mean": ppo_trainer.masked_mean(values, mask),
            "mean_rows": ppo_trainer.masked_mean(values, mask, axis=1),
            "var_unbiased": ppo_trainer.masked_var(values, mask, unbiased=True),
            "var_biased": ppo_trainer.masked_var(values, mask, unbiased=False),
            "whiten": ppo_trainer.masked_whiten(values, mask, shift_mean=True),
            "whiten_keep_mean": ppo_trainer.masked_whiten(values, mask, shift_mean=False),
        })
    return {"results": results}


class FixedRollouts:
    """Stands in for sampling and for the reward model: preset responses and scores, by query."""

    def __init__(self, queries: torch.Tensor, responses: torch.Tensor, scores: torch.Tensor, temperature: float):
        self.row_of = {tuple(query.tolist()): row for row, query in enumerate(queries)}
        self.responses = responses
        self.scores = scores
        self.temperature = temperature
        self.order: list[int] = []

    def rows(self, queries: torch.Tensor) -> list[int]:
        return [self.row_of[tuple(query.tolist())] for query in queries]

    def batch_generation(self, model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
        rows = self.rows(queries)
        self.order.extend(rows)
        query_responses = torch.cat([queries, self.responses[rows]], dim=1)
        context = queries.shape[1]
        with torch.no_grad():
            logits = model(input_ids=query_responses, attention_mask=torch.ones_like(query_responses)).logits
        # TRL samples with temperature + 1e-7 and keeps the warped scores as its logits
        return query_responses, logits[:, context - 1 : -1] / (self.temperature + 1e-7)

    def reward(self, query_responses, context_length):
        return self.scores[self.rows(query_responses[:, :context_length])].to(torch.float32)


def check_reward_head_reads_the_final_hidden_state(model, ids) -> float:
    """TRL's get_reward scores `hidden_states[-1]`; on this transformers version that must be the
    normed last hidden state, i.e. the sequence-classification logits at the last token."""
    from trl.experimental.utils import get_reward

    with torch.no_grad():
        _, last, _ = get_reward(model, ids, pad_token_id=-1, context_length=1)
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.squeeze(-1)
    return (last - expected).abs().max().item()


def one_ppo_update(inputs: dict, config: dict, workdir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    tokenizer = AutoTokenizer.from_pretrained(inputs["policy_dir"])
    policy = AutoModelForCausalLM.from_pretrained(inputs["policy_dir"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(inputs["reference_dir"], dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(inputs["value_dir"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(inputs["reward_dir"], dtype=torch.float32)
    queries, responses, scores = inputs["queries"], inputs["responses"], inputs["scores"]
    rows = len(queries)

    head_check = check_reward_head_reads_the_final_hidden_state(value_model, torch.cat([queries, responses], 1)[:2])
    rollouts = FixedRollouts(queries, responses, scores, config["temperature"])
    original_get_reward = ppo_trainer.get_reward
    original_batch_generation = ppo_trainer.batch_generation

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is reward_model:
            return None, rollouts.reward(query_responses, context_length), None
        return original_get_reward(model, query_responses, pad_token_id, context_length)

    permutations: list[list[int]] = []
    original_permutation = numpy.random.permutation

    def permutation(n):
        drawn = original_permutation(n)
        permutations.append([int(i) for i in drawn])
        return drawn

    numpy.random.seed(config["seed"])  # TRL draws its minibatches from numpy's global generator
    ppo_trainer.batch_generation = rollouts.batch_generation
    ppo_trainer.get_reward = get_reward
    numpy.random.permutation = permutation
    try:
        args = PPOConfig(
            output_dir=os.path.join(workdir, config["name"]), report_to="none", save_strategy="no",
            logging_steps=1, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=config["seed"],
            gradient_checkpointing=False, total_episodes=rows, per_device_train_batch_size=rows,
            gradient_accumulation_steps=1, num_mini_batches=config["num_mini_batches"],
            num_ppo_epochs=config["num_ppo_epochs"], optim="sgd", lr_scheduler_type="constant",
            learning_rate=config["learning_rate"], weight_decay=0.0, kl_coef=config["kl_coef"],
            kl_estimator=config["kl_estimator"], whiten_rewards=config["whiten_rewards"],
            cliprange=config["cliprange"], cliprange_value=config["cliprange_value"], vf_coef=config["vf_coef"],
            gamma=config["gamma"], lam=config["lam"], temperature=config["temperature"],
            response_length=responses.shape[1], stop_token=None, missing_eos_penalty=None,
            num_sample_generations=0, local_rollout_forward_batch_size=rows,
        )
        dataset = Dataset.from_dict({"input_ids": queries.tolist()})
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                             eval_dataset=dataset)
        trainer.train()
    finally:
        ppo_trainer.batch_generation = original_batch_generation
        ppo_trainer.get_reward = original_get_reward
        numpy.random.permutation = original_permutation
    return {
        "policy": {name: tensor.detach().clone() for name, tensor in policy.state_dict().items()},
        "value": {name: tensor.detach().clone() for name, tensor in value_model.state_dict().items()},
        "log": [entry for entry in trainer.state.log_history if "objective/kl" in entry],
        "rollout_order": rollouts.order,
        "permutations": [p for p in permutations if len(p) == rows],
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__,
        "head_check": head_check,
    }


def ppo_update(inputs: dict) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        return {"updates": [one_ppo_update(inputs, config, workdir) for config in inputs["configs"]]}


def main(argv: list[str]) -> int:
    command, source, target = argv
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # before anything imports TRL or the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import trl

    if trl.__version__ != ORACLE_VERSION:
        print(f"expected TRL {ORACLE_VERSION} on PYTHONPATH, got {trl.__version__} at {trl.__file__}")
        return 2
    torch.use_deterministic_algorithms(True)
    inputs = torch.load(source, weights_only=True)
    outputs = {"masked-stats": masked_stats, "ppo-update": ppo_update}[command](inputs)
    outputs["trl_version"] = trl.__version__
    torch.save(outputs, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
