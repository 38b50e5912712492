"""Log-probabilities of completions under a model, and KL estimates from them.

    prompt_ids = generation.render_prompts(tokenizer, conversations)   # THE prompt rendering
    policy = completion_logprobs(model, prompt_ids, [s.token_ids for s in samples], pad_id)
    with adapters_disabled(model):                                      # a LoRA model's reference
        reference = completion_logprobs(model, prompt_ids, completion_ids, pad_id)
    kl = kl_summary(policy, reference)                                 # {"kl": ..., "kl_per_token": ...}

A completion's tokens are scored exactly as the sampler produced them (token
ids, not re-tokenized text), so the numbers are the model's own probabilities
of those samples. Rows are left-padded with explicit position ids (the same
positions `generate` and vLLM use) and the logits are kept only for the
completion positions (`logits_to_keep`): a 49k-token vocabulary times a long
prompt would otherwise dominate memory.

KL estimators (hand-written: TRL computes KL only inside its trainers, on its
own batches). For samples y ~ policy p, with log-ratio r_t = log q(y_t) - log p(y_t)
per token (q = reference):

    k1 = -r_t               unbiased for KL(p || q), noisy, can be negative per sample
    k3 = exp(r_t) - 1 - r_t unbiased per token given the prefix, always >= 0, lower variance

(J. Schulman, "Approximating KL Divergence", 2020.) Summed over a completion's
tokens they estimate the sequence-level KL(p || q) of that prompt.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, get_args

from align import cost

KLEstimator = Literal["k1", "k3"]
KL_ESTIMATORS = get_args(KLEstimator)


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (longest first), so a padded batch is mostly real
    tokens. Sampled answers run from a few tokens to the cap: in the DPO stage's order a scoring
    batch of 16 held 1.76x its real tokens, sorted 1.05x. Callers put results back by index."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                        batch_size: int = 8, progress: str | None = None) -> list[list[float]]:
    """Per-token log p(completion_t | prompt, completion_<t) under `model`, one list per row.

    Computed in the model's dtype, log-softmax in float32; no gradients. Rows are batched by
    length (`length_sorted_batches`) and returned in their given order."""
    import torch

    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = next(model.parameters()).device
    batches = length_sorted_batches([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=progress, unit="batch")
    results: list[list[float] | None] = [None] * len(prompt_ids)
    cost.count_forward(cost.sizes(model), sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)),
                       headless_tokens=sum(len(p) - 1 for p in prompt_ids))  # logits_to_keep: completions only
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), plain_forward(model):
            for batch in batches:
                values = _batch_logprobs(model, [prompt_ids[i] for i in batch], [completion_ids[i] for i in batch],
                                         pad_id, device)
                for index, value in zip(batch, values):
                    results[index] = value
    finally:
        model.train(was_training)
    return results


@contextlib.contextmanager
def plain_forward(model):
    """Run `model`'s own `forward`, not accelerate's mixed-precision wrapper around it.

    Under bf16/fp16 mixed precision, accelerate's `prepare_model` (which every TRL trainer runs)
    replaces the instance's `forward` with an autocast wrapper and keeps the original beside it as
    `_original_forward`; the model then computes in bf16 whatever the caller asked. The policy
    stages' held-out KL went through it and read ~20% low on a bf16 CPU (k3 1.12 against 1.41 nats
    in fp32, 32 samples of the main job's DPO model). Each preparation (one per on-policy round)
    wraps again, so the plain forward is the class's: the instance attribute is set aside here and
    put back after. Hand-written: accelerate's `extract_model_from_parallel(keep_fp32_wrapper=False)`
    undoes the wrapper for good, and the trainer still needs it."""
    patched = [module for module in model.modules() if "_original_forward" in vars(module) and "forward" in vars(module)]
    saved = [vars(module).pop("forward") for module in patched]
    try:
        yield model
    finally:
        for module, forward in zip(patched, saved):
            module.forward = forward


def _batch_logprobs(model, prompts, completions, pad_id, device) -> list[list[float]]:
    import torch

    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(row) for row in rows)
    longest = max(len(c) for c in completions)
    if longest == 0:
        return [[] for _ in rows]
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device)
    attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    # Left padding puts every completion at the right edge: the logits predicting the last
    # `longest` tokens are at positions width-longest-1 .. width-2.
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                   logits_to_keep=longest + 1, use_cache=False).logits[:, :-1]
    targets = input_ids[:, width - longest :]
    chosen = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return [chosen[row, longest - len(c) :].tolist() for row, c in enumerate(completions)]


def sequence_logprobs(per_token: list[list[float]]) -> list[float]:
    """log p(completion | prompt): the sum over its tokens."""
    return [float(sum(row)) for row in per_token]


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside, a PEFT model computes with its base weights (its reference); a plain model is unchanged."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def kl_per_sequence(policy: list[list[float]], reference: list[list[float]], estimator: str = "k3") -> list[float]:
    """Per-completion estimate of KL(policy || reference), from the per-token logprobs of policy samples."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    if len(policy) != len(reference):
        raise ValueError(f"{len(policy)} policy rows but {len(reference)} reference rows")
    values = []
    for row_p, row_q in zip(policy, reference):
        if len(row_p) != len(row_q):
            raise ValueError(f"token counts differ: {len(row_p)} vs {len(row_q)}")
        total = 0.0
        for lp, lq in zip(row_p, row_q):
            log_ratio = lq - lp
            total += -log_ratio if estimator == "k1" else math.expm1(log_ratio) - log_ratio
        values.append(total)
    return values


def kl_summary(policy: list[list[float]], reference: list[list[float]], estimator: str = "k3") -> dict:
    """Mean per-completion KL (nats) and KL per token, over a set of policy samples."""
    per_sequence = kl_per_sequence(policy, reference, estimator)
    tokens = sum(len(row) for row in policy)
    total = sum(per_sequence)
    return {
        "kl": total / len(per_sequence) if per_sequence else float("nan"),
        "kl_per_token": total / tokens if tokens else float("nan"),
        "kl_estimator": estimator,
        "kl_samples": len(per_sequence),
    }
