"""align.ppo_math against TRL 1.12's PPO, the last TRL release that has one (slow tier).

TRL 1.12 runs in a subprocess (tests/oracles/trl_ppo.py) with its install folder
on PYTHONPATH, shadowing the venv's TRL 1.16; `make test-deps` installs it
(mk/oracles.mk, `oracle-deps`). A missing install fails these tests: skipping
would let the only external check on our PPO math vanish silently.

Level 1: masked mean / variance / whitening on random masked fp64 tensors.
Level 2: one full TRL PPO update (policy, reference, value model, SGD) against
the same update written with our functions (`reference_update` below), on
inputs where our intentional differences cannot show:
  - full-length responses (no eos, no pad): TRL's score lands one column after
    the eos and its value mask keeps one extra column (design notes P1); on a
    full row both put the score on the last column and every mask is all ones;
  - TRL's approxkl / ratio / entropy are unmasked means: equal on full rows;
  - TRL never clips gradients, so neither does this update.
tests/test_ppo_math.py shows by hand that ours is right where they differ.

The whole module is slow: it starts a TRL process (about 8 s of imports) and needs
the oracle that `make test-deps` installs, which `make test-fast` does not ask for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align import files, ppo_math

pytestmark = pytest.mark.slow

TRL_ORACLE_VERSION = "1.12.0"
ORACLE_SCRIPT = Path(__file__).resolve().parent / "oracles" / "trl_ppo.py"


def oracle_dir() -> Path:
    return files.cache_dir() / "oracles" / f"trl-{TRL_ORACLE_VERSION}"


def run_oracle(command: str, inputs: dict, tmp_path: Path, timeout: int = 300) -> dict:
    target = oracle_dir()
    if not (target / "trl" / "experimental" / "ppo").is_dir():
        pytest.fail(f"TRL {TRL_ORACLE_VERSION} oracle missing at {target}: `make test-deps` installs it", pytrace=False)
    source, result = tmp_path / f"{command}-in.pt", tmp_path / f"{command}-out.pt"
    torch.save(inputs, source)
    env = dict(os.environ, PYTHONPATH=str(target), TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ORACLE_SCRIPT), command, str(source), str(result)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"oracle exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    outputs = torch.load(result, weights_only=True)
    assert outputs["trl_version"] == TRL_ORACLE_VERSION
    return outputs


# ---------------------------------------------------------------- level 1: masked statistics

def random_masked_cases(count: int = 6) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    cases = []
    for index in range(count):
        rows, width = 3 + index, 5 + 2 * index
        values = torch.randn(rows, width, generator=generator, dtype=torch.float64) * (1 + index) + index
        lengths = torch.randint(1, width + 1, (rows,), generator=generator)
        lengths[0] = max(int(lengths[0]), 2)  # at least 2 valid entries for the unbiased variance
        cases.append({"values": values, "mask": ppo_math.response_mask(lengths, width).to(torch.float64)})
    return cases


def close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-7) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)


def test_masked_statistics_match_trl(tmp_path):
    cases = random_masked_cases()
    oracle = run_oracle("masked-stats", {"cases": cases}, tmp_path)["results"]
    for case, expected in zip(cases, oracle, strict=True):
        values, mask = case["values"], case["mask"]
        valid = mask.bool()
        close(ppo_math.masked_mean(values, mask), expected["mean"])
        close(ppo_math.masked_mean(values, mask, dim=1), expected["mean_rows"])
        close(ppo_math.masked_var(values, mask, unbiased=True), expected["var_unbiased"])
        close(ppo_math.masked_var(values, mask, unbiased=False), expected["var_biased"])
        for shift_mean, key in ((True, "whiten"), (False, "whiten_keep_mean")):
            ours = ppo_math.masked_whiten(values, mask, shift_mean=shift_mean)
            close(ours[valid], expected[key][valid])
            assert (ours[~valid] == 0).all()  # TRL leaves padding whitened too; ours zeroes it


# ---------------------------------------------------------------- level 2: one full PPO update

ROWS, PROMPT_TOKENS, RESPONSE_TOKENS = 16, 6, 8
BASE_CONFIG = {"num_ppo_epochs": 2, "num_mini_batches": 2, "learning_rate": 1e-2, "kl_coef": 0.05,
               "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "temperature": 1.0}
CONFIGS = [
    {**BASE_CONFIG, "name": "k1-plain", "seed": 1, "kl_estimator": "k1", "whiten_rewards": False, "cliprange": 0.2},
    # whitened rewards, k3, and a clip range small enough that the second minibatch clips
    {**BASE_CONFIG, "name": "k3-whiten-clip", "seed": 2, "kl_estimator": "k3", "whiten_rewards": True,
     "cliprange": 0.02, "cliprange_value": 0.02},
    # discounting and a shorter trace; one epoch of four minibatches (a larger lr, so the critic moves as far)
    {**BASE_CONFIG, "name": "discounted-4-minibatches", "seed": 3, "kl_estimator": "k1", "whiten_rewards": False,
     "cliprange": 0.2, "gamma": 0.9, "lam": 0.8, "num_ppo_epochs": 1, "num_mini_batches": 4, "learning_rate": 3e-2},
]
PARAMETER_TOLERANCE = 1e-5
TRL_STATS = ["objective/kl", "objective/non_score_reward", "objective/scores", "objective/rlhf_reward",
             "loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "policy/approxkl_avg",
             "val/ratio", "objective/entropy"]


def build_tiny_value_model(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A 2-layer LlamaForSequenceClassification (1 label) shaped like conftest's tiny policy."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ppo_inputs(tmp_path_factory, default_model_dir) -> dict:
    """Tiny policy, reference, value and reward models; 16 equal-length prompts, full-length responses, scores."""
    from align.models import load_tokenizer
    from tests.conftest import build_tiny_model

    root = tmp_path_factory.mktemp("ppo-oracle")
    policy_dir = build_tiny_model(root / "policy", default_model_dir, seed=3)
    # a reference with other weights, so the KL penalty (and its estimator) is not 0 at the first update
    reference_dir = build_tiny_model(root / "reference", default_model_dir, seed=6)
    for folder in (policy_dir, reference_dir):
        load_tokenizer(str(default_model_dir)).save_pretrained(folder)  # the project's pad != eos
    generator = torch.Generator().manual_seed(0)
    # ordinary tokens only (ids 1000-39999: no pad, eos or other special token), all rows distinct
    tokens = torch.randint(1000, 40000, (ROWS, PROMPT_TOKENS + RESPONSE_TOKENS), generator=generator)
    return {
        "policy_dir": str(policy_dir),
        "reference_dir": str(reference_dir),
        "value_dir": str(build_tiny_value_model(root / "value", default_model_dir, seed=4)),
        "reward_dir": str(build_tiny_value_model(root / "reward", default_model_dir, seed=5)),
        "queries": tokens[:, :PROMPT_TOKENS],
        "responses": tokens[:, PROMPT_TOKENS:],
        "scores": torch.randn(ROWS, generator=generator),
        "configs": CONFIGS,
    }


@pytest.fixture(scope="module")
def trl_updates(ppo_inputs, tmp_path_factory) -> list[dict]:
    return run_oracle("ppo-update", ppo_inputs, tmp_path_factory.mktemp("ppo-oracle-run"), timeout=600)["updates"]


def load_models(inputs: dict):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(inputs["policy_dir"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(inputs["reference_dir"], dtype=torch.float32).eval()
    value_model = AutoModelForSequenceClassification.from_pretrained(inputs["value_dir"], dtype=torch.float32)
    return policy, reference, value_model


def unpadded(ids: torch.Tensor) -> dict:
    attention = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": attention.cumsum(1) - 1}


def response_logprobs(model, ids: torch.Tensor, prompt_tokens: int, temperature: float) -> torch.Tensor:
    """log softmax(z_t / tau)[y_t] at the positions that predict the response tokens."""
    logits = model(**unpadded(ids), use_cache=False).logits[:, prompt_tokens - 1 : -1] / temperature
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, prompt_tokens:].unsqueeze(-1)).squeeze(-1)


def response_values(value_model, ids: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """V_t = score(final hidden state) at the same positions as the policy's logits."""
    hidden = value_model.model(**unpadded(ids), use_cache=False).last_hidden_state
    return value_model.score(hidden[:, prompt_tokens - 1 : -1]).squeeze(-1)


def reference_update(inputs: dict, config: dict, rollout_order: list[int], permutations: list[list[int]]) -> dict:
    """One PPO update written with align.ppo_math: rollout tensors, rewards, GAE, then K epochs x M
    minibatches of SGD on the token-mean policy loss + vf_coef x value loss (no grad clipping)."""
    policy, reference, value_model = load_models(inputs)
    ids = torch.cat([inputs["queries"], inputs["responses"]], 1)[rollout_order]
    scores = inputs["scores"][rollout_order]
    prompt_tokens = inputs["queries"].shape[1]
    temperature = config["temperature"] + 1e-7  # TRL divides every logit by this; so do we, here
    mask = ppo_math.response_mask([inputs["responses"].shape[1]] * len(ids), inputs["responses"].shape[1])
    with torch.no_grad():
        old_logp = response_logprobs(policy, ids, prompt_tokens, temperature)
        ref_logp = response_logprobs(reference, ids, prompt_tokens, temperature)
        old_values = response_values(value_model, ids, prompt_tokens)
    kl = ppo_math.kl_per_token(old_logp, ref_logp, config["kl_estimator"])
    rewards = ppo_math.shape_rewards(scores, kl, mask, config["kl_coef"])
    if config["whiten_rewards"]:
        rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo_math.gae(rewards, old_values, mask, config["gamma"], config["lam"])
    advantages = ppo_math.masked_whiten(advantages, mask)

    optimizer = torch.optim.SGD([*policy.parameters(), *value_model.parameters()], lr=config["learning_rate"])
    minibatch = len(ids) // config["num_mini_batches"]
    steps = []
    assert len(permutations) == config["num_ppo_epochs"]
    for permutation in permutations:
        for start in range(0, len(ids), minibatch):
            rows = torch.tensor(permutation[start : start + minibatch])
            new_logp = response_logprobs(policy, ids[rows], prompt_tokens, temperature)
            new_values = response_values(value_model, ids[rows], prompt_tokens)
            pg_loss, stats = ppo_math.policy_loss(new_logp, old_logp[rows], advantages[rows], mask[rows],
                                                  config["cliprange"])
            vf_loss, vf_clipfrac = ppo_math.value_loss(new_values, old_values[rows], returns[rows], mask[rows],
                                                       config["cliprange_value"])
            (pg_loss + config["vf_coef"] * vf_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            log_ratio = (new_logp - old_logp[rows]).detach()
            steps.append({"loss/policy_avg": pg_loss.item(), "loss/value_avg": vf_loss.item(),
                          "policy/clipfrac_avg": stats["clipfrac"], "val/clipfrac_avg": vf_clipfrac,
                          "val/ratio": stats["ratio_mean"],
                          # TRL's diagnostic, 1/2 mean(log rho)^2, to check the ratios themselves
                          "policy/approxkl_avg": 0.5 * (log_ratio**2).mean().item()})
    sequence_kl = ppo_math.masked_sum_per_row(kl, mask)
    non_score = ppo_math.masked_sum_per_row(-config["kl_coef"] * kl, mask).mean().item()
    summary = {key: sum(step[key] for step in steps) / len(steps) for key in steps[0]}
    summary.update({"objective/kl": sequence_kl.mean().item(), "objective/non_score_reward": non_score,
                    "objective/scores": scores.mean().item(), "objective/rlhf_reward": non_score + scores.mean().item(),
                    "objective/entropy": ppo_math.masked_sum_per_row(-old_logp, mask).mean().item()})
    return {"policy": policy.state_dict(), "value": value_model.state_dict(), "stats": summary, "steps": steps}


def max_parameter_gap(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[name] - theirs[name]).abs().max().item() for name in ours)


@pytest.mark.parametrize("config", CONFIGS, ids=[c["name"] for c in CONFIGS])
def test_one_ppo_update_matches_trl(config, ppo_inputs, trl_updates):
    trl_run = trl_updates[CONFIGS.index(config)]
    assert trl_run["head_check"] < 1e-5, "TRL's get_reward no longer reads the normed final hidden state"
    assert sorted(trl_run["rollout_order"]) == list(range(ROWS))
    assert trl_run["optimizer"] == "SGD"
    ours = reference_update(ppo_inputs, config, trl_run["rollout_order"], trl_run["permutations"])

    initial_policy, _, initial_value = load_models(ppo_inputs)
    policy_moved = max_parameter_gap(ours["policy"], initial_policy.state_dict())
    value_moved = max_parameter_gap(ours["value"], initial_value.state_dict())
    policy_gap = max_parameter_gap(ours["policy"], trl_run["policy"])
    value_gap = max_parameter_gap(ours["value"], trl_run["value"])
    print(f"{config['name']}: max |dtheta| of the update: policy {policy_moved:.3e}, value {value_moved:.3e}; "
          f"ours vs TRL: policy {policy_gap:.3e}, value {value_gap:.3e}")
    # the update must move both models far more than the tolerance, or the comparison proves nothing
    assert min(policy_moved, value_moved) > 100 * PARAMETER_TOLERANCE
    assert policy_gap <= PARAMETER_TOLERANCE and value_gap <= PARAMETER_TOLERANCE
    assert policy_gap <= 1e-3 * policy_moved and value_gap <= 1e-3 * value_moved  # within 0.1% of the step

    (trl_log,) = trl_run["log"]
    for key in TRL_STATS:
        assert ours["stats"][key] == pytest.approx(trl_log[key], rel=1e-4, abs=1e-6), (key, ours["stats"][key],
                                                                                      trl_log[key])
    if config["cliprange"] < 0.1:
        assert ours["stats"]["policy/clipfrac_avg"] > 0, "the small clip range was meant to clip"
