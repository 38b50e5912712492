"""The length term of the reward loss (align/length_bias.py): the correlation by hand, the
collator handing lengths past the model, and the reward stage with it on data where the
label rides along with length."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trl.trainer.reward_trainer import DataCollatorForPreference

from align.length_bias import LENGTH_KEY, ResponseLengthCollator, batch_correlation
from tests.conftest import assert_ok, run_stage, write_jsonl


def test_batch_correlation_is_pearson_on_log_lengths():
    rewards = torch.tensor([1.0, 2.0, 4.0, 3.0])
    lengths = torch.tensor([0.0, math.e - 1, math.e ** 2 - 1, math.e ** 3 - 1])  # log1p: 0, 1, 2, 3
    # by hand: r - mean = (-1.5, -0.5, 1.5, 0.5), l - mean = (-1.5, -0.5, 0.5, 1.5)
    # sum of products 2.25 + 0.25 + 0.75 + 0.75 = 4; sums of squares 5 and 5 -> 4 / 5
    assert batch_correlation(rewards, lengths).item() == pytest.approx(0.8, abs=1e-6)
    assert batch_correlation(-rewards, lengths).item() == pytest.approx(-0.8, abs=1e-6)
    assert batch_correlation(rewards * 7 + 3, lengths).item() == pytest.approx(0.8, abs=1e-6)  # scale-free


def test_a_reward_spread_below_the_floor_counts_as_the_floor():
    """Rewards (-1.5, -0.5, 1.5, 0.5)/10: spread 5/100 < the floor 4·1² -> ρ = 0.4 / sqrt(4·5)."""
    rewards = torch.tensor([1.0, 2.0, 4.0, 3.0]) / 10
    lengths = torch.tensor([0.0, math.e - 1, math.e ** 2 - 1, math.e ** 3 - 1])
    assert batch_correlation(rewards, lengths).item() == pytest.approx(0.4 / math.sqrt(20), abs=1e-6)
    assert batch_correlation(rewards, lengths, min_reward_std=0.0).item() == pytest.approx(0.8, abs=1e-6)


def test_batch_correlation_of_equal_lengths_is_zero_with_a_zero_gradient():
    rewards = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    value = batch_correlation(rewards, torch.tensor([10.0, 10.0, 10.0]))
    value.backward()
    assert value.item() == 0.0 and torch.equal(rewards.grad, torch.zeros(3))
    with pytest.raises(ValueError, match="3 rewards but 2 lengths"):
        batch_correlation(rewards, torch.tensor([1.0, 2.0]))


def test_the_gradient_of_the_squared_correlation_pulls_rewards_off_length():
    """One gradient step on ρ² makes the rewards less correlated with length."""
    rewards = torch.tensor([3.0, 1.0, 2.5, 0.0], requires_grad=True)
    lengths = torch.tensor([5.0, 40.0, 8.0, 100.0])  # short answers scored high: ρ < 0
    before = batch_correlation(rewards, lengths)
    (before ** 2).backward()
    with torch.no_grad():
        after = batch_correlation(rewards - 0.5 * rewards.grad, lengths)
    assert before.item() < -0.9 and abs(after.item()) < abs(before.item())


def test_the_collator_adds_chosen_then_rejected_lengths_in_trl_row_order():
    examples = [{"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "chosen_tokens": 2, "rejected_tokens": 1},
                {"chosen_ids": [6, 7], "rejected_ids": [8], "chosen_tokens": 1, "rejected_tokens": 9}]
    batch = ResponseLengthCollator(DataCollatorForPreference(pad_token_id=0))(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]  # TRL's own rows
    assert batch[LENGTH_KEY].tolist() == [2.0, 1.0, 1.0, 9.0]


def test_the_trainer_loss_is_trls_plus_the_weighted_squared_correlation(tiny_model_dir, tmp_path):
    """compute_loss on a real batch of the tiny model: TRL's pairwise loss (with its reward
    centring) + λ·ρ², ρ recomputed here from the model's own scores and the answers' token
    lengths; the lengths never reach the model's forward."""
    from trl import RewardConfig

    from align import models, scoring
    from align.length_bias import LengthDecorrelatedRewardTrainer

    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    pairs = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": "yes " * (i + 1),
              "rejected": "no " * (12 - 3 * i)} for i in range(4)]
    config = RewardConfig(output_dir=str(tmp_path), remove_unused_columns=False, report_to=[], use_cpu=True,
                          center_rewards_coefficient=0.01, per_device_train_batch_size=4)
    trainer = LengthDecorrelatedRewardTrainer(
        model=str(tiny_model_dir), args=config, processing_class=tokenizer, length_decorrelation=2.0,
        train_dataset=scoring.reward_dataset(tokenizer, pairs, response_lengths=True))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    lengths = batch[LENGTH_KEY].tolist()
    assert lengths == [scoring.response_length(tokenizer, p["chosen"]) for p in pairs] + [
        scoring.response_length(tokenizer, p["rejected"]) for p in pairs]
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = scores[:4].double(), scores[4:].double()
    pairwise = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + 0.01 * ((chosen + rejected) ** 2).mean()
    logs = torch.log1p(torch.tensor(lengths, dtype=torch.float64))
    centred, centred_logs = scores.double() - scores.double().mean(), logs - logs.mean()
    spread = max((centred ** 2).sum().item(), 8 * 1.0)  # the floor: 8 rewards x (1 reward unit)^2
    rho = (centred * centred_logs).sum().item() / math.sqrt(spread * (centred_logs ** 2).sum().item())
    assert abs(rho) > 1e-4  # the term is not trivially zero on this batch
    assert loss == pytest.approx(pairwise.item() + 2.0 * rho ** 2, rel=1e-5)
    # logged: the batch's plain Pearson correlation (no floor), what a person reading the log expects
    pearson = (centred * centred_logs).sum().item() / math.sqrt(
        (centred ** 2).sum().item() * (centred_logs ** 2).sum().item())
    assert trainer._metrics["eval"]["length_corr"] == [pytest.approx(pearson, rel=1e-4)]


def test_the_reward_stage_trains_with_the_length_term(runs_root, tiny_sft_run, tiny_data):
    """`--length_decorrelation` through the stage: the config records it, TRL's log shows the
    batch correlation next to its own metrics, and the gate still measures the saved model."""
    run = "length-term"
    (runs_root / run).mkdir()
    (runs_root / run / "sft").symlink_to(runs_root / tiny_sft_run / "sft")
    result = run_stage("reward", "--run", run, "--ranked_files", str(tiny_data["ranked"]), "--max_steps", "4",
                       "--per_device_train_batch_size", "4", "--logging_steps", "2", "--precision", "fp32",
                       "--lora_top_layers", "1", "--gate_max_abs_length_corr", "1.0", "--length_decorrelation", "1")
    assert_ok(result)
    folder = runs_root / run / "reward"
    facts = json.loads((folder / "manifest.json").read_text())
    assert facts["config"]["length_decorrelation"] == 1.0
    assert "length_correlation" in facts["metrics"] and facts["metrics"]["train_steps"] == 4
    assert "'length_corr'" in (folder / "logs" / "stage.log").read_text()
    rejected = run_stage("reward", "--run", run, "--ranked_files", str(tiny_data["ranked"]), "--force",
                         "--length_decorrelation", "-1")
    assert rejected.returncode == 2 and "length_decorrelation must be >= 0" in rejected.stderr
