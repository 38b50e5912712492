"""align.ppo_math against hand computations and properties (fast tier: no models).

The hand-written numbers below are worked out in the comments, so a reader can
check them without running anything. TRL 1.12 is the other check
(tests/test_ppo_oracle.py, slow tier).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from align import logprobs, ppo_math

F64 = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------- masks and masked statistics

def test_response_mask_comes_from_lengths():
    mask = ppo_math.response_mask([3, 1, 0], width=4)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert mask.dtype == torch.float32


@pytest.mark.parametrize("lengths", [[5], [-1]])
def test_response_mask_refuses_lengths_outside_the_width(lengths):
    with pytest.raises(ValueError, match="lengths"):
        ppo_math.response_mask(lengths, width=4)


def test_masked_mean_and_var_ignore_padding():
    values = t([[1, 2, 100], [3, 4, -50]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    assert ppo_math.masked_mean(values, mask).item() == pytest.approx(2.5)
    assert ppo_math.masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 3.5])
    # deviations -1.5, -0.5, 0.5, 1.5: squares sum to 5; biased 5/4, unbiased 5/3
    assert ppo_math.masked_var(values, mask, unbiased=False).item() == pytest.approx(5 / 4)
    assert ppo_math.masked_var(values, mask).item() == pytest.approx(5 / 3)


def test_unbiased_variance_of_one_token_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        ppo_math.masked_var(t([[1.0, 2.0]]), t([[1, 0]]))


def test_whitening_matches_a_hand_computation():
    values = t([[1, 2, 100], [3, 4, -50]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    scale = 1 / math.sqrt(5 / 3 + 1e-8)  # mean 2.5, unbiased variance 5/3 (above)
    expected = [[-1.5 * scale, -0.5 * scale, 0.0], [0.5 * scale, 1.5 * scale, 0.0]]
    whitened = ppo_math.masked_whiten(values, mask)
    assert whitened.tolist() == [pytest.approx(row, abs=1e-12) for row in expected]
    kept = ppo_math.masked_whiten(values, mask, shift_mean=False)
    assert kept.tolist() == [pytest.approx([v + 2.5 * m for v, m in zip(row, mrow)], abs=1e-12)
                             for row, mrow in zip(expected, mask.tolist())]
    # whitened valid entries: mean 0 and unbiased variance 1 (up to the 1e-8)
    assert ppo_math.masked_mean(whitened, mask).item() == pytest.approx(0, abs=1e-12)
    assert ppo_math.masked_var(whitened, mask).item() == pytest.approx(1, abs=1e-7)


def test_explained_variance_bounds():
    returns = t([[1, 2, 3], [4, 0, 0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    assert ppo_math.explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1)
    constant = torch.full_like(returns, ppo_math.masked_mean(returns, mask).item())
    assert ppo_math.explained_variance(constant, returns, mask).item() == pytest.approx(0, abs=1e-12)
    assert ppo_math.explained_variance(-returns, returns, mask).item() < 0
    assert math.isnan(ppo_math.explained_variance(returns, torch.ones_like(returns), mask).item())


def test_entropy_of_uniform_and_of_one_hot_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -1e4, -1e4, -1e4]])
    assert ppo_math.entropy_from_logits(logits).tolist() == pytest.approx([math.log(4), 0.0], abs=1e-6)


# ---------------------------------------------------------------- KL estimators

@pytest.mark.parametrize("estimator", ppo_math.KL_ESTIMATORS)
def test_kl_is_zero_for_identical_logprobs(estimator):
    logp = -torch.rand(3, 5, dtype=F64) * 4
    assert torch.equal(ppo_math.kl_per_token(logp, logp.clone(), estimator), torch.zeros_like(logp))


def test_kl_estimators_by_hand():
    logp, ref = t([[-1.0]]), t([[-1.5]])  # Delta = 0.5
    assert ppo_math.kl_per_token(logp, ref, "k1").item() == pytest.approx(0.5)
    assert ppo_math.kl_per_token(logp, ref, "k2").item() == pytest.approx(0.125)
    assert ppo_math.kl_per_token(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)


def test_k3_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 32, generator=generator, dtype=F64) * 10
    ref = -torch.rand(64, 32, generator=generator, dtype=F64) * 10
    assert (ppo_math.kl_per_token(logp, ref, "k3") >= 0).all()
    assert (ppo_math.kl_per_token(logp, ref, "k1") < 0).any()  # k1 can be, per token


def test_unknown_kl_estimator_is_refused():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        ppo_math.kl_per_token(t([[0.0]]), t([[0.0]]), "k4")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_are_unbiased_on_a_known_categorical(estimator):
    """Samples from p: the estimators' mean approaches KL(p || q) (within 5 standard errors)."""
    p = t([0.5, 0.2, 0.15, 0.1, 0.05])
    q = t([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = (p * (p / q).log()).sum().item()
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    per_sample = ppo_math.kl_per_token(p.log()[draws], q.log()[draws], estimator)
    standard_error = per_sample.std().item() / math.sqrt(per_sample.numel())
    assert abs(per_sample.mean().item() - exact) < 5 * standard_error


def _padded(rows, width, rng):
    """Right-pad with garbage, which the mask must hide."""
    return t([row + [rng.uniform(-9, 9)] * (width - len(row)) for row in rows])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_masked_token_sums_equal_logprobs_kl_per_sequence(estimator):
    """The project's one per-sequence definition (align.logprobs) and the per-token tensors agree."""
    rng = random.Random(0)
    lengths = [5, 1, 3, 7]
    policy = [[-rng.uniform(0.01, 6) for _ in range(n)] for n in lengths]
    reference = [[-rng.uniform(0.01, 6) for _ in range(n)] for n in lengths]
    width = max(lengths)
    mask = ppo_math.response_mask(lengths, width).to(F64)
    per_token = ppo_math.kl_per_token(_padded(policy, width, rng), _padded(reference, width, rng), estimator)
    sums = ppo_math.masked_sum_per_row(per_token, mask)
    expected = logprobs.kl_per_sequence(policy, reference, estimator)
    assert sums.tolist() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- reward shaping

def test_score_sits_on_the_last_valid_token():
    kl = t([[0.2, 0.4, -0.2, 9.0], [1.0, 9.0, 9.0, 9.0]])  # 9.0: garbage on padding
    mask = ppo_math.response_mask([3, 1], 4).to(F64)
    rewards = ppo_math.shape_rewards(t([2.0, 5.0]), kl, mask, beta=0.5)
    assert rewards.tolist() == [pytest.approx([-0.1, -0.2, 0.1 + 2.0, 0.0]), pytest.approx([-0.5 + 5.0, 0, 0, 0])]


def test_score_on_a_full_length_row_sits_on_its_last_column():
    rewards = ppo_math.shape_rewards(t([1.5]), torch.zeros(1, 3, dtype=F64), torch.ones(1, 3, dtype=F64), beta=0.1)
    assert rewards.tolist() == [[0.0, 0.0, 1.5]]


def test_an_empty_response_cannot_carry_a_score():
    with pytest.raises(ValueError, match="at least one valid token"):
        ppo_math.shape_rewards(t([1.0]), torch.zeros(1, 3, dtype=F64), torch.zeros(1, 3, dtype=F64), beta=0.1)


# ---------------------------------------------------------------- GAE

# Two rows, lengths 3 and 1; gamma 0.9, lam 0.8 (gamma * lam = 0.72). Row 1's padding holds garbage.
GAE_REWARDS = [[0.1, -0.2, 1.0], [2.0, 9.0, 9.0]]
GAE_VALUES = [[0.5, 0.4, 0.3], [0.5, 7.0, 7.0]]
GAE_LENGTHS = [3, 1]
# Row 0: delta_2 = 1.0 - 0.3 = 0.7;   delta_1 = -0.2 + 0.9 * 0.3 - 0.4 = -0.33;  delta_0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04
#        A_2 = 0.7;  A_1 = -0.33 + 0.72 * 0.7 = 0.174;  A_0 = -0.04 + 0.72 * 0.174 = 0.08528
# Row 1: delta_0 = 2.0 + 0 - 0.5 = 1.5 = A_0 (nothing after the last valid token)
GAE_ADVANTAGES = [[0.08528, 0.174, 0.7], [1.5, 0.0, 0.0]]
GAE_RETURNS = [[0.58528, 0.574, 1.0], [2.0, 0.0, 0.0]]


def _gae(rewards, values, lengths, gamma=0.9, lam=0.8):
    rewards, values = t(rewards), t(values)
    return ppo_math.gae(rewards, values, ppo_math.response_mask(lengths, rewards.shape[1]), gamma, lam)


def _approx_rows(rows, abs=1e-12):
    return [pytest.approx(row, abs=abs) for row in rows]


def test_gae_matches_the_hand_computed_example():
    advantages, returns = _gae(GAE_REWARDS, GAE_VALUES, GAE_LENGTHS)
    assert advantages.tolist() == _approx_rows(GAE_ADVANTAGES)
    assert returns.tolist() == _approx_rows(GAE_RETURNS)


def test_gae_with_gamma_and_lambda_one_is_the_monte_carlo_return_minus_the_value():
    advantages, returns = _gae(GAE_REWARDS, GAE_VALUES, GAE_LENGTHS, gamma=1.0, lam=1.0)
    # row 0: reward-to-go 0.9, 0.8, 1.0; row 1: 2.0
    assert returns.tolist() == _approx_rows([[0.9, 0.8, 1.0], [2.0, 0, 0]])
    assert advantages.tolist() == _approx_rows([[0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3], [2.0 - 0.5, 0, 0]])


def test_gae_with_lambda_zero_is_the_td_error():
    advantages, _ = _gae(GAE_REWARDS, GAE_VALUES, GAE_LENGTHS, lam=0.0)
    assert advantages.tolist() == _approx_rows([[-0.04, -0.33, 0.7], [1.5, 0, 0]])


def test_gae_pad_columns_leave_valid_entries_unchanged_and_come_out_zero():
    wider_rewards = [row + [5.0, -3.0] for row in GAE_REWARDS]
    wider_values = [row + [4.0, 8.0] for row in GAE_VALUES]
    advantages, returns = _gae(wider_rewards, wider_values, GAE_LENGTHS)
    assert advantages.tolist() == _approx_rows([row + [0.0, 0.0] for row in GAE_ADVANTAGES])
    assert returns.tolist() == _approx_rows([row + [0.0, 0.0] for row in GAE_RETURNS])


def test_decoupled_gae_keeps_the_policy_lambda_and_gives_the_critic_its_own():
    """gamma 0.9, policy lam 0.8, critic lam 1: the advantages are the hand-computed example's;
    the critic's targets are the discounted reward-to-go (row 0: 0.1 - 0.18 + 0.81 = 0.73,
    -0.2 + 0.9 = 0.7, 1.0), where lam 0.8 gave 0.58528, 0.574, 1.0."""
    mask = ppo_math.response_mask(GAE_LENGTHS, 3)
    advantages, returns = ppo_math.decoupled_gae(t(GAE_REWARDS), t(GAE_VALUES), mask, 0.9, 0.8, critic_lam=1.0)
    assert advantages.tolist() == _approx_rows(GAE_ADVANTAGES)
    assert returns.tolist() == _approx_rows([[0.73, 0.7, 1.0], [2.0, 0.0, 0.0]])
    for same in (None, 0.8):  # no critic lambda of its own: gae itself
        advantages, returns = ppo_math.decoupled_gae(t(GAE_REWARDS), t(GAE_VALUES), mask, 0.9, 0.8, critic_lam=same)
        assert advantages.tolist() == _approx_rows(GAE_ADVANTAGES) and returns.tolist() == _approx_rows(GAE_RETURNS)


def test_the_eos_token_gets_the_score_itself_not_through_a_pad_value():
    """Where TRL 1.12 differs (design notes P1): it adds the score one column after the eos and
    bootstraps the eos token's advantage from a value read at that pad column. Here the eos of a
    finished row (length 2 in width 4, gamma 1, lam 1) gets A = s - V_eos, whatever the pad columns hold."""
    mask = ppo_math.response_mask([2], 4).to(F64)
    rewards = ppo_math.shape_rewards(t([3.0]), torch.zeros(1, 4, dtype=F64), mask, beta=0.1)
    values = t([[0.5, 0.25, 40.0, -40.0]])  # a critic's outputs at pad positions: meaningless
    advantages, returns = ppo_math.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert rewards.tolist() == [[0.0, 3.0, 0.0, 0.0]]
    assert advantages.tolist() == _approx_rows([[3.0 - 0.5, 3.0 - 0.25, 0.0, 0.0]])
    assert returns.tolist() == _approx_rows([[3.0, 3.0, 0.0, 0.0]])


# ---------------------------------------------------------------- policy loss

def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    advantages = t([[1.0, -2.0, 0.5], [3.0, 100.0, 100.0]])
    mask = ppo_math.response_mask([3, 1], 3).to(F64)
    logp = -torch.rand(2, 3, dtype=F64)
    loss, stats = ppo_math.policy_loss(logp.clone(), logp, advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5 + 3.0) / 4)
    assert stats == pytest.approx({"clipfrac": 0.0, "dual_clipfrac": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0,
                                   "ratio_var": 0.0})


# One row of five tokens plus one padded token, clip 0.2:
#   token     A     rho   branch that wins
#   0        +1     1.5   clipped (rho > 1 + eps, A > 0): no gradient
#   1        -1     0.5   clipped (rho < 1 - eps, A < 0): no gradient
#   2        +1     0.5   unclipped (pessimistic side): gradient
#   3        -1     1.5   unclipped (pessimistic side): gradient
#   4        +2     1.1   inside the trust region: gradient
#   5 (pad)  +5     3.0   masked
CLIP_ADVANTAGES = [[1.0, -1.0, 1.0, -1.0, 2.0, 5.0]]
CLIP_RATIOS = [[1.5, 0.5, 0.5, 1.5, 1.1, 3.0]]


def _clip_case(**kwargs):
    old = torch.full((1, 6), -2.0, dtype=F64)
    new = (old + t(CLIP_RATIOS).log()).requires_grad_(True)
    mask = ppo_math.response_mask([5], 6).to(F64)
    loss, stats = ppo_math.policy_loss(new, old, t(CLIP_ADVANTAGES), mask, clip=0.2, **kwargs)
    loss.backward()
    return loss, stats, new.grad[0]


def test_clipped_tokens_get_zero_gradient_and_clipfrac_counts_exactly_them():
    loss, stats, grad = _clip_case()
    # per token: -A * (clipped or raw ratio): -1.2, 0.8, -0.5, 1.5, -2.2; mean over 5
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5 - 2.2) / 5)
    # d/d(logp) of -A * rho / n is -A * rho / 5 where unclipped
    assert grad.tolist() == pytest.approx([0.0, 0.0, -0.5 / 5, 1.5 / 5, -2.2 / 5, 0.0])
    assert grad[0] == 0 and grad[1] == 0 and grad[5] == 0
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    # ratio and approx_kl are masked means: the padded token's ratio of 3 does not count (TRL 1.12 counts it)
    ratios = CLIP_RATIOS[0][:5]
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / 5)
    assert stats["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 5)


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    # token 3 (A = -1, rho = 1.5) exceeds a dual clip of 1.4: its loss becomes 1.4 * |A| with no gradient
    loss, stats, grad = _clip_case(dual_clip=1.4)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.4 - 2.2) / 5)
    assert grad.tolist() == pytest.approx([0.0, 0.0, -0.5 / 5, 0.0, -2.2 / 5, 0.0])
    assert stats["dual_clipfrac"] == pytest.approx(1 / 5)


def test_dual_clip_bound_holds_on_random_inputs():
    generator = torch.Generator().manual_seed(1)
    old = -torch.rand(8, 16, generator=generator, dtype=F64) * 3
    new = old + torch.randn(8, 16, generator=generator, dtype=F64) * 2
    advantages = -torch.rand(8, 16, generator=generator, dtype=F64)  # all negative
    mask = torch.ones(8, 16, dtype=F64)
    loss, _ = ppo_math.policy_loss(new, old, advantages, mask, clip=0.2, dual_clip=3.0)
    per_token_bound = (3.0 * -advantages).mean()
    assert loss.item() <= per_token_bound.item() + 1e-12
    unbounded, _ = ppo_math.policy_loss(new, old, advantages, mask, clip=0.2)
    assert unbounded.item() > loss.item()  # some ratios exceed 3, so the bound bit


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        _clip_case(dual_clip=1.0)


def test_importance_weights_scale_each_token_and_carry_no_gradient():
    old = torch.full((1, 2), -1.0, dtype=F64)
    new = old.clone().requires_grad_(True)
    weights = t([[2.0, 0.5]]).requires_grad_(True)
    loss, _ = ppo_math.policy_loss(new, old, t([[1.0, 3.0]]), torch.ones(1, 2, dtype=F64), clip=0.2,
                                   is_weights=weights)
    assert loss.item() == pytest.approx(-(2.0 * 1.0 + 0.5 * 3.0) / 2)
    loss.backward()
    assert weights.grad is None
    assert new.grad.tolist() == [pytest.approx([-1.0, -0.75])]


# ---------------------------------------------------------------- value loss

def test_value_loss_by_hand_and_zero_gradient_where_the_clipped_branch_dominates():
    # clip_v 0.2, V_old = 0
    #   token 0: G = 1,  V = 0.8: unclipped 0.04, clipped (0.2 - 1)^2 = 0.64 wins: no gradient
    #   token 1: G = 1,  V = -0.5: unclipped 2.25 wins over (-0.2 - 1)^2 = 1.44: gradient V - G = -1.5 (x 1/2 x 2 / n)
    #   token 2: G = 0.1, V = 0.05: inside the clip range, both 0.0025: gradient -0.05
    #   token 3: padding
    new = t([[0.8, -0.5, 0.05, 7.0]]).requires_grad_(True)
    returns = t([[1.0, 1.0, 0.1, -7.0]])
    mask = ppo_math.response_mask([3], 4).to(F64)
    loss, clipfrac = ppo_math.value_loss(new, torch.zeros(1, 4, dtype=F64), returns, mask, clip_v=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 2.25 + 0.0025) / 3)
    assert clipfrac == pytest.approx(1 / 3)
    loss.backward()
    assert new.grad.tolist() == [pytest.approx([0.0, -1.5 / 3, -0.05 / 3, 0.0])]


def test_value_loss_without_clipping_is_half_the_squared_error_everywhere():
    """clip_v None, the same tokens: token 0 (0.8, far from V_old = 0) keeps its gradient V - G = -0.2."""
    new = t([[0.8, -0.5, 0.05, 7.0]]).requires_grad_(True)
    mask = ppo_math.response_mask([3], 4).to(F64)
    loss, clipfrac = ppo_math.value_loss(new, torch.zeros(1, 4, dtype=F64), t([[1.0, 1.0, 0.1, -7.0]]), mask, None)
    assert loss.item() == pytest.approx(0.5 * (0.04 + 2.25 + 0.0025) / 3) and clipfrac == 0.0
    loss.backward()
    assert new.grad.tolist() == [pytest.approx([-0.2 / 3, -1.5 / 3, -0.05 / 3, 0.0])]


# ---------------------------------------------------------------- truncated importance sampling

def test_tis_weights_truncate_or_mask_above_the_cap():
    rollout = torch.zeros(1, 4, dtype=F64)
    old = t([[math.log(0.5), math.log(2.0), math.log(10.0), math.log(9.0)]])
    mask = ppo_math.response_mask([3], 4).to(F64)
    truncated = ppo_math.tis_weights(old, rollout, mask, cap=3.0)
    assert truncated.tolist() == [pytest.approx([0.5, 2.0, 3.0, 0.0])]
    masked = ppo_math.tis_weights(old, rollout, mask, cap=3.0, mode="mask")
    assert masked.tolist() == [pytest.approx([0.5, 2.0, 0.0, 0.0])]


def test_tis_weights_are_detached_and_check_their_settings():
    old = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    assert not ppo_math.tis_weights(old, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2), cap=3.0).requires_grad
    with pytest.raises(ValueError, match="mode"):
        ppo_math.tis_weights(old, old, torch.ones(1, 2), cap=3.0, mode="sequence")
    with pytest.raises(ValueError, match="cap"):
        ppo_math.tis_weights(old, old, torch.ones(1, 2), cap=0.0)


# ---------------------------------------------------------------- KL controllers

@pytest.mark.parametrize(("kl", "expected_error"), [(6.6, 0.1), (12.0, 0.2), (0.0, -0.2), (5.7, -0.05)])
def test_adaptive_kl_follows_the_proportional_rule_with_its_clip(kl, expected_error):
    controller = ppo_math.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert controller.update(kl, n_steps=100) == pytest.approx(0.1 * (1 + expected_error * 100 / 10_000))
    assert controller.value == pytest.approx(0.1 * (1 + expected_error * 0.01))


def test_adaptive_kl_compounds_and_fixed_kl_stays():
    adaptive = ppo_math.AdaptiveKLController(0.05, target=1.0, horizon=100)
    adaptive.update(10.0, n_steps=10)
    adaptive.update(10.0, n_steps=10)
    assert adaptive.value == pytest.approx(0.05 * 1.02 * 1.02)
    fixed = ppo_math.FixedKLController(0.05)
    assert fixed.update(100.0, n_steps=10) == 0.05


def test_adaptive_kl_refuses_a_nonpositive_target():
    with pytest.raises(ValueError, match="target"):
        ppo_math.AdaptiveKLController(0.05, target=0.0, horizon=100)
