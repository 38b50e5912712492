"""PPO's model side: rollout tensors, forward passes (policy, reference, critic) and the updater.

Hand-written: TRL 1.16 ships no PPO (removed in 1.13). The math is `align.ppo_math`
(checked against TRL 1.12); this module puts models around it:

    batch = RolloutBatch.from_samples(tokenizer, prompts, samples)     # generation.Sample lists
    old = token_logprobs(policy, batch, temperature)                     # no grad: torch, never vLLM
    with logprobs.adapters_disabled(policy):
        ref = token_logprobs(policy, batch, temperature)                 # the reference: SFT
    values = critic_values(critic, batch)
    ... ppo_math: kl_per_token, shape_rewards, gae, masked_whiten ...
    metrics = PPOUpdater(policy, critic, ...).update(batch, old, values, advantages, returns)

Layout (TRL's): input_ids = [left-padded prompt | right-padded response], width P + R;
response token t of every row sits at column P + t, so the logits and values that
belong to it are read at column P + t - 1 (the position that predicts it). The response
mask comes from the sample lengths, never from token ids: a sampled pad token is real.
Position ids are cumsum(attention) - 1 as in `logprobs.completion_logprobs` (and vLLM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from align import cost, ppo_math, processes
from align.generation import render_prompts


# ---------------------------------------------------------------- rollout tensors


@dataclass
class RolloutBatch:
    """One rollout batch as tensors (see the module docstring for the layout)."""

    input_ids: torch.Tensor       # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long: 1 on real prompt and response tokens
    position_ids: torch.Tensor    # (B, P + R) long
    mask: torch.Tensor            # (B, R) float: 1 on the valid response tokens
    prompt_width: int             # P
    rollout_logprobs: torch.Tensor  # (B, R) float: the sampler's logprobs (vLLM's raw), 0 on padding
    finished: torch.Tensor        # (B,) bool: the sample ended with eos (finish_reason "stop")

    @property
    def response_width(self) -> int:
        return self.mask.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1).long()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor) -> "RolloutBatch":
        """The sub-batch of rows `index` (same widths)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[index] for name in
                                            ("input_ids", "attention_mask", "position_ids", "mask",
                                             "rollout_logprobs", "finished")})

    @classmethod
    def from_ids(cls, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                 rollout_logprobs: list[list[float]] | None = None,
                 finished: list[bool] | None = None) -> "RolloutBatch":
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        lengths = [len(ids) for ids in response_ids]
        prompt_width = max(len(ids) for ids in prompt_ids)
        response_width = max(max(lengths), 1)
        rows, attention = [], []
        for prompt, response in zip(prompt_ids, response_ids):
            left, right = prompt_width - len(prompt), response_width - len(response)
            rows.append([pad_id] * left + list(prompt) + list(response) + [pad_id] * right)
            attention.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        attention_mask = torch.tensor(attention, dtype=torch.long)
        mask = ppo_math.response_mask(lengths, response_width)
        sampler = torch.zeros(len(rows), response_width)
        for row, values in enumerate(rollout_logprobs or []):
            sampler[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        finished = torch.tensor(finished if finished is not None else [False] * len(rows), dtype=torch.bool)
        return cls(torch.tensor(rows, dtype=torch.long), attention_mask,
                   (attention_mask.cumsum(dim=1) - 1).clamp(min=0), mask, prompt_width, sampler, finished)

    @classmethod
    def from_samples(cls, tokenizer, prompts: list[list[dict]], samples: list) -> "RolloutBatch":
        """One row per (prompt messages, generation.Sample); prompts rendered as every backend does."""
        return cls.from_ids(render_prompts(tokenizer, prompts), [s.token_ids for s in samples],
                            tokenizer.pad_token_id, [s.logprobs for s in samples],
                            [s.finish_reason == "stop" for s in samples])


# ---------------------------------------------------------------- forward passes


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield torch.arange(start, min(start + size, count))


def real_tokens(batch: RolloutBatch) -> tuple[int, int]:
    """(real tokens, of which prompt positions with no logits kept) for cost accounting."""
    prompt = int(batch.attention_mask[:, : batch.prompt_width].sum())
    return int(batch.attention_mask.sum()), prompt - len(batch)


def response_logits(model, batch: RolloutBatch) -> torch.Tensor:
    """(B, R, vocab) logits at the positions that predict each response token (with grad)."""
    width = batch.response_width
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   logits_to_keep=width + 1, use_cache=False).logits
    return logits[:, :-1]


def logprobs_from_logits(logits: torch.Tensor, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """log softmax(z / tau)[y_t] in float32, 0 on padding (TRL scales by tau at rollout, reference
    and training alike; at tau = 1 these are the raw logprobs vLLM returns)."""
    targets = batch.input_ids[:, batch.prompt_width:]
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    chosen = torch.log_softmax(scaled, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return chosen * batch.mask


def token_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, batch_size: int | None = None,
                   grad: bool = False) -> torch.Tensor:
    """(B, R) per-token log-probs of the responses: the tensor sibling of
    `logprobs.completion_logprobs` (same position ids), with gradient when `grad`."""
    context = contextlib.nullcontext() if grad else torch.no_grad()
    parts = []
    with context:
        for rows in _chunks(len(batch), batch_size or len(batch)):
            sub = batch.rows(rows)
            parts.append(logprobs_from_logits(response_logits(model, sub), sub, temperature))
            if not grad:  # a training step counts its forward with its backward (PPOUpdater)
                cost.count_forward(cost.sizes(model), *real_tokens(sub))
    return torch.cat(parts)


def critic_backbone_and_head(critic):
    """(transformer trunk, score head) of a sequence classifier, PEFT-wrapped or not."""
    model = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    return getattr(model, model.base_model_prefix), model.score


def critic_values(critic, batch: RolloutBatch, batch_size: int | None = None, grad: bool = False) -> torch.Tensor:
    """(B, R) values V_t = score(final hidden state) at the positions of the policy's logits
    (TRL's `full_value[:, P-1:-1]`), 0 on padding. The final hidden state is post-norm, the
    one the reward model's head reads."""
    trunk, head = critic_backbone_and_head(critic)
    context = contextlib.nullcontext() if grad else torch.no_grad()
    parts = []
    with context:
        for rows in _chunks(len(batch), batch_size or len(batch)):
            sub = batch.rows(rows)
            hidden = trunk(input_ids=sub.input_ids, attention_mask=sub.attention_mask,
                           position_ids=sub.position_ids, use_cache=False).last_hidden_state
            start = sub.prompt_width - 1
            values = head(hidden[:, start : start + sub.response_width]).squeeze(-1).float()
            parts.append(values * sub.mask)
            if not grad:
                cost.count_forward(cost.sizes(critic), *real_tokens(sub))
    return torch.cat(parts)


def disable_dropout(model) -> None:
    """p = 0 in every dropout module (TRL's disable_dropout_in_model): otherwise the ratio is not 1 at step 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_critic(reward_model_dir: str, peft_config):
    """The value model: the reward stage's sequence classifier (its score head reads every
    position) plus its own LoRA (`peft_config`: SEQ_CLS, modules_to_save [score]); a plain
    trainable copy when `peft_config` is None."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from align.models import load_tokenizer

    critic = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32)
    critic.config.pad_token_id = load_tokenizer(reward_model_dir).pad_token_id
    if peft_config is not None:
        critic = get_peft_model(critic, peft_config)
    disable_dropout(critic)
    return critic


def greedy_ids(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """HF greedy completions, one prompt at a time (no padding): what a pushed engine must reproduce."""
    results = []
    with torch.no_grad():
        for ids in prompt_ids:
            inputs = torch.tensor([ids])
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id)
            completion = out[0, len(ids):].tolist()
            if eos_id in completion:
                completion = completion[: completion.index(eos_id) + 1]
            results.append(completion)
    return results


# ---------------------------------------------------------------- the update


@dataclass
class PPOSettings:
    """The update's knobs (names as TRL 1.12's PPOConfig where it has them)."""

    num_ppo_epochs: int = 2
    num_mini_batches: int = 2
    micro_batch_size: int = 8      # rows per forward/backward; gradients accumulate over a minibatch
    cliprange: float = 0.2
    cliprange_value: float | None = 0.2  # None: no value clipping
    vf_coef: float = 0.1
    max_grad_norm: float | None = 1.0  # policy and critic clipped apart (None: no clipping, as TRL's loop)
    temperature: float = 1.0
    dual_clip: float | None = None
    tis: str | None = None         # None | "truncate" | "mask": truncated IS against the sampler's logprobs
    tis_cap: float = 3.0


def adamw(parameters, lr: float) -> torch.optim.Optimizer:
    """AdamW with eps 1e-5 (the N+ code, CleanRL): PyTorch's 1e-8 makes early RLHF updates aggressive."""
    return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=lr, eps=1e-5, weight_decay=0.0)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """{name: a copy} of the parameters that train (LoRA and the critic's score head; all of a full fine-tune)."""
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put `trainable_state`'s tensors back; every trainable parameter must be there."""
    parameters = dict(model.named_parameters())
    wanted = {name for name, parameter in parameters.items() if parameter.requires_grad}
    if set(state) != wanted:
        raise ValueError(f"checkpoint holds {len(state)} trainable tensors, the model has {len(wanted)} "
                         f"(first differences: {sorted(set(state) ^ wanted)[:3]})")
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


class PPOUpdater:
    """K epochs x M minibatches of clipped policy + value losses on one rollout batch.

    `permutation(n)` gives each epoch's row order (injectable: the TRL oracle feeds its own);
    by default a torch generator seeded with `seed`. Pass `policy_optimizer`/`critic_optimizer`
    to use another optimiser (the oracle's SGD); `train_policy=False` updates the critic only
    (critic warm-up)."""

    def __init__(self, policy, critic, settings: PPOSettings, policy_lr: float, critic_lr: float, seed: int = 0,
                 permutation: Callable[[int], Sequence[int]] | None = None, policy_optimizer=None,
                 critic_optimizer=None, autocast_bf16: bool = False):
        self.policy, self.critic, self.settings = policy, critic, settings
        disable_dropout(policy)
        disable_dropout(critic)
        self.policy_optimizer = policy_optimizer or adamw(policy.parameters(), policy_lr)
        self.critic_optimizer = critic_optimizer or adamw(critic.parameters(), critic_lr)
        self.generator = torch.Generator().manual_seed(seed)  # its state is checkpointed (align/resume.py)
        self.permutation = permutation or (lambda n: torch.randperm(n, generator=self.generator).tolist())
        self.autocast_bf16 = autocast_bf16
        self.steps = 0
        # what a token costs each model (align.cost.Sizes), for cost accounting
        self.sizes = [cost.sizes(policy), cost.sizes(critic)]

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast_bf16 else contextlib.nullcontext()

    def state_dict(self) -> dict:
        """What a resumed run needs to go on exactly: trainable weights, optimizers, the epoch-order RNG."""
        return {"policy": trainable_state(self.policy), "critic": trainable_state(self.critic),
                "policy_optimizer": self.policy_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "permutation_rng": self.generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        load_trainable_state(self.policy, state["policy"])
        load_trainable_state(self.critic, state["critic"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.generator.set_state(state["permutation_rng"])
        self.steps = state["steps"]

    def update(self, batch: RolloutBatch, old_logprobs: torch.Tensor, old_values: torch.Tensor,
               advantages: torch.Tensor, returns: torch.Tensor, train_policy: bool = True) -> list[dict]:
        """Run the epochs; returns one metrics row per minibatch step (TRL's names)."""
        settings = self.settings
        if len(batch) < settings.num_mini_batches:
            raise ValueError(f"{len(batch)} rollouts cannot fill {settings.num_mini_batches} minibatches")
        is_weights = None
        if settings.tis:
            is_weights = ppo_math.tis_weights(old_logprobs, batch.rollout_logprobs, batch.mask, settings.tis_cap,
                                              settings.tis)
        self.policy.train()
        self.critic.train()
        rows = []
        for epoch in range(settings.num_ppo_epochs):
            order = torch.as_tensor(list(self.permutation(len(batch))), dtype=torch.long)
            for minibatch, index in enumerate(torch.tensor_split(order, settings.num_mini_batches)):
                row = self._step(batch.rows(index), old_logprobs[index], old_values[index], advantages[index],
                                 returns[index], None if is_weights is None else is_weights[index], train_policy)
                rows.append({"epoch": epoch, "minibatch": minibatch, **row})
        self.policy.eval()
        self.critic.eval()
        return rows

    def _step(self, batch, old_logp, old_values, advantages, returns, is_weights, train_policy) -> dict:
        """One optimiser step per model over one minibatch, in micro-batches; each micro-batch's
        token-mean loss is weighted by its share of the minibatch's tokens, so the accumulated
        gradient is that of the minibatch token mean (not a mean of micro-batch means).

        Several processes: every rank holds the whole minibatch and runs the forward and backward
        passes of its share of the rows (`processes.my_rows`); the weights are shares of the whole
        minibatch's tokens, so the gradients summed over ranks are the one-process gradient, and
        every rank clips and steps identically. The statistics are over the gathered rows."""
        settings = self.settings
        total_tokens = batch.mask.sum()
        share = processes.my_rows(len(batch))
        if len(share) == 0:
            raise ValueError(f"a minibatch of {len(batch)} rollouts leaves a process without rows; "
                             "raise prompts_per_update or lower num_mini_batches or the number of processes")
        new_logp, new_values = [], []
        for chunk in _chunks(len(share), settings.micro_batch_size):
            rows = share[chunk]
            micro = batch.rows(rows)
            weight = micro.mask.sum() / total_tokens
            with self.autocast():
                # critic warm-up: the policy does not move, so its log-probs are the old ones and its
                # forward and backward passes would only add zero gradients
                logp = (logprobs_from_logits(response_logits(self.policy, micro), micro, settings.temperature)
                        if train_policy else old_logp[rows])
                values = critic_values(self.critic, micro, grad=True)
            vf_loss, _ = ppo_math.value_loss(values, old_values[rows], returns[rows], micro.mask,
                                             settings.cliprange_value)
            loss = settings.vf_coef * vf_loss
            if train_policy:
                pg_loss, _ = ppo_math.policy_loss(logp, old_logp[rows], advantages[rows], micro.mask,
                                                  settings.cliprange, settings.dual_clip,
                                                  None if is_weights is None else is_weights[rows])
                loss = loss + pg_loss
            (loss * weight).backward()
            for sizes in self.sizes if train_policy else self.sizes[1:]:  # forward and backward on these tokens
                cost.count_training(sizes, *real_tokens(micro))
            new_logp.append(logp.detach())
            new_values.append(values.detach())
        processes.sum_gradients((trainable(self.policy) if train_policy else []) + trainable(self.critic))
        grad_policy = self._clip_and_step(self.policy, self.policy_optimizer) if train_policy else 0.0
        grad_critic = self._clip_and_step(self.critic, self.critic_optimizer)
        self.steps += 1
        # statistics over the whole minibatch, from the detached pieces of every rank
        logp = processes.gather_rows(torch.cat(new_logp))
        values = processes.gather_rows(torch.cat(new_values))
        pg_loss, stats = ppo_math.policy_loss(logp, old_logp, advantages, batch.mask, settings.cliprange,
                                              settings.dual_clip, is_weights)
        vf_loss, vf_clipfrac = ppo_math.value_loss(values, old_values, returns, batch.mask, settings.cliprange_value)
        return {"loss/policy_avg": pg_loss.item(), "loss/value_avg": vf_loss.item(),
                "policy/clipfrac_avg": stats["clipfrac"], "policy/dual_clipfrac": stats["dual_clipfrac"],
                "policy/approxkl_avg": stats["approx_kl"], "val/ratio": stats["ratio_mean"],
                "val/ratio_var": stats["ratio_var"], "val/clipfrac_avg": vf_clipfrac,
                "grad_norm/policy": grad_policy, "grad_norm/critic": grad_critic}

    def _clip_and_step(self, model, optimizer) -> float:
        parameters = trainable(model)
        if self.settings.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, self.settings.max_grad_norm).item()
        else:
            norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in parameters if p.grad is not None))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm


# ---------------------------------------------------------------- rollout statistics


def sampler_mismatch(batch: RolloutBatch, old_logprobs: torch.Tensor) -> dict:
    """How far the sampler's (vLLM's) logprobs are from the trainer's: mean and max |delta| and
    k3(sampler || trainer) per token (OpenRLHF's vllm_kl). Meaningful at temperature 1, top_p 1."""
    mask = batch.mask
    delta = (old_logprobs - batch.rollout_logprobs) * mask
    valid = delta[mask.bool()].abs()
    return {"rollout/logprob_abs_diff_mean": valid.mean().item(), "rollout/logprob_abs_diff_max": valid.max().item(),
            "rollout/vllm_kl": ppo_math.masked_mean(torch.expm1(delta) - delta, mask).item()}


def mean_rows(rows: list[dict]) -> dict:
    """The mean of every numeric key over minibatch rows (TRL's `*_avg` over epochs x minibatches)."""
    keys = [key for key in rows[0] if key not in ("epoch", "minibatch", "update", "step")]
    return {key: sum(row[key] for row in rows) / len(rows) for key in keys}
