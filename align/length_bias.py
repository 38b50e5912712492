"""Length-robust reward modelling: a reward that does not just track answer length.

A reward model trained on human pairs can learn "short (or long) is good" when
length rides along with what people preferred: on HH-RLHF harmless, refusals are
short and usually chosen, and the default model's held-out scores ranked with
length at Spearman -0.65 (the reward gate's `gate_max_abs_length_corr` check).

`length_decorrelation: λ` (configs/reward.yaml) adds λ·ρ² to TRL's Bradley-Terry
loss, where ρ is the Pearson correlation, within each training batch, between the
rewards and the log token lengths of the responses they score. It is the
correlation term of ODIN (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates
Hacking in RLHF", eq. 4) applied to the one reward head: ODIN trains a second,
length head to soak up the length signal; with pairs whose length barely predicts
the label (HH harmless: the chosen answer is the shorter one in 53% of pairs)
there is little for that head to learn, so we keep the penalty alone.

Hand-written: TRL's RewardTrainer offers margins and reward centring, nothing on
length. The subclass calls TRL's own loss and adds the term; the collator wrapper
hands the response lengths (scoring.reward_dataset's `chosen_tokens` and
`rejected_tokens` columns) to the loss without passing them to the model.
"""

from __future__ import annotations

import torch
from trl import RewardTrainer

LENGTH_KEY = "response_tokens"  # the batch key: chosen lengths, then rejected lengths (TRL's layout)


def batch_correlation(rewards: torch.Tensor, lengths: torch.Tensor, min_reward_std: float = 1.0) -> torch.Tensor:
    """Pearson correlation of rewards with log(1 + length) over one batch, differentiable in rewards,
    with the rewards' spread floored at `min_reward_std`:

        ρ = Σ (r_i - r̄)(l_i - l̄) / sqrt(max(Σ (r_i - r̄)², n·s²) · Σ (l_i - l̄)²),  l_i = log(1 + length_i)

    The floor: ρ is scale-free, so its gradient grows as 1/spread; at the start of training,
    when all rewards are nearly equal, the plain ρ² term swamped the pairwise loss (a tiny model
    trained with it ranked every held-out pair backwards). Above the floor (one reward unit by
    default) this is Pearson's ρ exactly.
    Log lengths: the gate measures a rank correlation (Spearman), which a few very long
    answers cannot dominate; on the log scale they cannot dominate this one either.
    Zero (with a zero gradient) when the lengths are all equal: nothing to decorrelate."""
    rewards = rewards.float().flatten()
    logs = torch.log1p(lengths.to(rewards.device, torch.float32).flatten())
    if rewards.shape != logs.shape:
        raise ValueError(f"{rewards.numel()} rewards but {logs.numel()} lengths")
    centred_rewards, centred_logs = rewards - rewards.mean(), logs - logs.mean()
    length_spread = (centred_logs ** 2).sum()
    if length_spread.item() < 1e-12:
        return rewards.sum() * 0.0
    reward_spread = torch.clamp((centred_rewards ** 2).sum(), min=rewards.numel() * min_reward_std ** 2)
    return (centred_rewards * centred_logs).sum() / torch.sqrt(reward_spread * length_spread)


class ResponseLengthCollator:
    """Wraps TRL's preference collator: adds `response_tokens` (chosen lengths, then rejected
    ones, the order of TRL's chosen-then-rejected rows) from the dataset's length columns."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        batch[LENGTH_KEY] = torch.tensor([example["chosen_tokens"] for example in examples]
                                         + [example["rejected_tokens"] for example in examples], dtype=torch.float32)
        return batch

    def __getattr__(self, name):
        return getattr(self.collator, name)


class LengthDecorrelatedRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer whose loss adds `length_decorrelation` · ρ(rewards, log lengths)²
    (batch_correlation, rewards' spread floored at `min_reward_std`); logs the batch's plain
    Pearson ρ as `length_corr`. The dataset needs `chosen_tokens` and
    `rejected_tokens` (scoring.reward_dataset(response_lengths=True)) and the Trainer must keep
    them (`remove_unused_columns: false`)."""

    def __init__(self, *args, length_decorrelation: float, min_reward_std: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if length_decorrelation < 0:
            raise ValueError(f"length_decorrelation must be >= 0, got {length_decorrelation}")
        self.length_decorrelation, self.min_reward_std = length_decorrelation, min_reward_std
        self.data_collator = ResponseLengthCollator(self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lengths = inputs.pop(LENGTH_KEY)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        rewards = outputs.logits.squeeze(-1)
        loss = loss + self.length_decorrelation * batch_correlation(rewards, lengths, self.min_reward_std) ** 2
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():  # the batch's plain Pearson correlation, floor or not
            self._metrics[mode]["length_corr"].append(batch_correlation(rewards, lengths, 0.0).item())
        return (loss, outputs) if return_outputs else loss
