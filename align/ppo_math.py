"""PPO's math for RLHF, as pure tensor functions (no models, no I/O).

Hand-written: TRL 1.16 ships no PPO (removed in 1.13). Each function is derived
from its formula in the docstring; tests/test_ppo_math.py checks them against
hand computations and tests/test_ppo_oracle.py against TRL 1.12, the last
release with `trl.experimental.ppo`.

Layout: every tensor is (batch, response width), one row per sample, response
token t of every row at column t (right padding). `mask` is 1.0 on the valid
tokens (the eos counts when the sample stopped) and 0.0 on padding, built from
lengths by `response_mask`, never from token ids (a sampled pad token is a real
token). One update, in order:

    mask = response_mask(lengths, width)
    kl = kl_per_token(old_logp, ref_logp, "k1")
    rewards = shape_rewards(scores, kl, mask, beta)      # score on the last valid token
    advantages, returns = decoupled_gae(rewards, old_values, mask, gamma, lam, critic_lam)
    advantages = masked_whiten(advantages, mask)
    # per epoch and minibatch:
    pg_loss, stats = policy_loss(new_logp, old_logp, advantages, mask, clip)
    vf_loss, vf_clipfrac = value_loss(new_values, old_values, returns, mask, clip_v)
    (pg_loss + vf_coef * vf_loss).backward()

Losses are token means over the minibatch's valid tokens.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = get_args(KLEstimator)
TISMode = Literal["truncate", "mask"]
TIS_MODES = get_args(TISMode)

# Added to the variance before whitening, so a constant batch does not divide by zero.
WHITEN_EPS = 1e-8


# ---------------------------------------------------------------- masked statistics

def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(m * x) / sum(m), over all entries or along `dim`."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """mean_m((x - mean_m(x))^2), times n/(n-1) (Bessel) when unbiased, n = sum(m)."""
    count = mask.sum()
    if unbiased and count < 2:
        raise ValueError(f"an unbiased variance needs at least 2 valid entries, got {int(count)}")
    centred = values - masked_mean(values, mask)
    variance = masked_mean(centred * centred, mask)
    return variance * count / (count - 1) if unbiased else variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mu) / sqrt(var + 1e-8) with the masked mean and unbiased variance; plus mu again
    when shift_mean is False (reward whitening keeps the mean). Masked entries come out 0."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask, unbiased=True) + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def masked_sum_per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t m_t * x_t for every row: per-sequence KL, log-probability, non-score reward."""
    return (values * mask.to(values.dtype)).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var_m(G - V) / Var_m(G): 1 for a perfect critic, 0 for a constant one, < 0 when worse.
    NaN when the returns are constant (nothing to explain)."""
    returns_var = masked_var(returns, mask, unbiased=False)
    if returns_var == 0:
        return torch.tensor(float("nan"), dtype=values.dtype)
    return 1 - masked_var(returns - values, mask, unbiased=False) / returns_var


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) * z per position (mask it with `masked_mean`)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


# ---------------------------------------------------------------- masks, KL, rewards

def response_mask(lengths, width: int) -> torch.Tensor:
    """float (batch, width): 1.0 where t < length of the row (responses right-padded to width)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if (lengths < 0).any() or (lengths > width).any():
        raise ValueError(f"response lengths must lie in [0, {width}], got {lengths.tolist()}")
    return (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(policy || reference) on policy samples, Delta = logp - ref_logp:

        k1 = Delta                    unbiased, can be negative
        k2 = Delta^2 / 2              biased, low variance (logging)
        k3 = exp(-Delta) - 1 + Delta  unbiased, >= 0 (Schulman 2020)

    The same estimators as `align.logprobs.kl_per_sequence` (there r = -Delta), token by token;
    summed over a row's valid tokens they give its per-sequence value."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    delta = logp - ref_logp
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta * delta
    return torch.expm1(-delta) + delta  # expm1: exact near Delta = 0, where k3 ~ Delta^2 / 2


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last valid token (the eos when the sample stopped); refuses empty rows."""
    lengths = mask.sum(dim=-1).long()
    if (lengths == 0).any():
        raise ValueError("every response needs at least one valid token to carry its score")
    return lengths - 1


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """R_t = -beta * kl_t + s * [t = T], 0 on padding; T = the row's last valid token.

    The score lands on the last valid token, i.e. the eos when the sample stopped (OpenRLHF,
    the N+ code), not one column later as in TRL 1.12. `scores` are taken as given: the caller
    has already applied the missing-eos penalty."""
    rewards = -beta * kl * mask.to(kl.dtype)
    rows = torch.arange(rewards.shape[0])
    rewards[rows, last_valid_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per row, backwards in t:

        delta_t = R_t + gamma * V_{t+1} - V_t,    V = 0 after the last valid token
        A_t     = delta_t + gamma * lam * A_{t+1}, A = 0 after the last valid token
        G_t     = A_t + V_t                       (the critic's target)

    Both come out 0 on padding. `mask` must be right-padded (`response_mask`)."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def decoupled_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                  critic_lam: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with one lambda for the policy's advantages and another for the critic's targets
    (decoupled GAE: Yuan et al. 2025, "What's Behind PPO's Collapse in Long-CoT? Value
    Optimization Holds the Secret", the VC-PPO paper):

        A = gae(R, V, lam).advantages        the policy's, as before
        G = gae(R, V, critic_lam).returns    the critic's target

    At critic_lam = 1 and gamma = 1, G_t is the reward-to-go (the Monte Carlo return), which does
    not lean on V at later tokens. A critic initialised from a reward model gets those wrong (the
    reward model learned only the end-of-turn position), and at lam 0.95 a 75-token answer's
    early targets weigh the final score by 0.95^74 ~ 0.02: the critic mostly chases its own
    values. critic_lam None: lam for both (TRL 1.12)."""
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if critic_lam is not None and critic_lam != lam:
        _, returns = gae(rewards, values, mask, gamma, critic_lam)
    return advantages, returns


# ---------------------------------------------------------------- losses

def policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float, dual_clip: float | None = None,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (Schulman et al. 2017), token mean over the valid tokens:

        rho_t = exp(new_t - old_t)
        l_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip, 1 + clip))
        l_t   = min(l_t, -A_t * dual_clip)  where A_t < 0     (dual clip, Ye et al. 2020)
        L     = mean_m(w_t * l_t)           w = detached truncated IS weights (`tis_weights`), or 1

    stats (floats, masked): clipfrac = share of tokens where the clipped branch wins (their
    gradient is 0), dual_clipfrac, approx_kl = mean((rho - 1) - log rho) (k3 of old || new),
    ratio_mean, ratio_var."""
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = new_logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    per_token = torch.max(unclipped, clipped)
    dual_clipped = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (per_token > bound)
        per_token = torch.where(dual_clipped, bound, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        ratio_d = ratio.detach()
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio_d.dtype), mask).item(),
            "dual_clipfrac": masked_mean(dual_clipped.to(ratio_d.dtype), mask).item(),
            "approx_kl": masked_mean((ratio_d - 1) - log_ratio.detach(), mask).item(),
            "ratio_mean": masked_mean(ratio_d, mask).item(),
            "ratio_var": masked_var(ratio_d, mask, unbiased=False).item(),
        }
    return loss, stats


def value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_v: float | None) -> tuple[torch.Tensor, float]:
    """Clipped value loss, token mean over the valid tokens:

        V_clip = clip(V, V_old - clip_v, V_old + clip_v)
        L^V    = 1/2 * mean_m( max((V - G)^2, (V_clip - G)^2) )

    and the share of tokens where the clipped branch wins (their gradient is 0). Where a value has
    moved more than clip_v from its old one towards its target, its loss gradient is 0 for the rest of
    the update, so a critic that starts far from its targets catches up over several updates (measured:
    0.2-0.3 per update at clip_v 0.2). clip_v None: no clipping, L^V = 1/2 mean_m((V - G)^2)."""
    if clip_v is None:
        return 0.5 * masked_mean((new_values - returns) ** 2, mask), 0.0
    clipped_values = torch.clamp(new_values, old_values - clip_v, old_values + clip_v)
    unclipped_loss = (new_values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    clipfrac = masked_mean((clipped_loss > unclipped_loss).to(new_values.dtype), mask).item()
    return loss, clipfrac


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float,
                mode: str = "truncate") -> torch.Tensor:
    """Token-level importance weights for the sampler/trainer mismatch (Yao et al. 2025), detached:

        w_t = exp(old_t - rollout_t)    old = trainer's logprob, rollout = the sampler's (vLLM's)
        truncate: min(w_t, cap)         mask: w_t where w_t <= cap, else 0 (the token drops out)

    0 on padding. Token level because a sequence-level ratio grows with the length."""
    if mode not in TIS_MODES:
        raise ValueError(f"TIS mode must be one of {', '.join(TIS_MODES)}, got {mode!r}")
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    weights = torch.exp((old_logp - rollout_logp).detach())
    if mode == "truncate":
        weights = torch.clamp(weights, max=cap)
    else:
        weights = torch.where(weights <= cap, weights, torch.zeros_like(weights))
    return weights * mask.to(weights.dtype)


# ---------------------------------------------------------------- KL coefficient

class FixedKLController:
    """beta stays where it started (TRL 1.12's only option; our default)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019, after each update of n_steps episodes:

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    KL is the mean per-sequence KL of the update's rollouts."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value
