"""align/ppo.py without the stage: rollout tensor layout, masks, log-prob and value alignment,
and the updater's invariants (fast tier: micro Llamas with a 64-token vocabulary, no tokenizer,
no fixtures that load the project's model)."""

from __future__ import annotations

import pytest
import torch

from align import logprobs, ppo, ppo_math
from align.generation import Sample

PAD = 0
VOCAB = 64


def micro_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       pad_token_id=PAD, eos_token_id=1, bos_token_id=2, **extra)


def micro_policy(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(micro_config()).eval()


def micro_critic(seed: int = 1):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(micro_config(num_labels=1)).eval()


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
RESPONSES = [[20, 21, 1], [PAD, 23, 24, 25, 26], [27]]  # a sampled pad token (row 1) is a real token


def test_rollout_layout_is_left_padded_prompt_then_right_padded_response():
    batch = ppo.RolloutBatch.from_ids(PROMPTS, RESPONSES, PAD, [[-0.5] * len(r) for r in RESPONSES],
                                      [True, False, False])
    assert batch.prompt_width == 4 and batch.response_width == 5
    assert batch.input_ids.tolist() == [
        [PAD, 5, 6, 7, 20, 21, 1, PAD, PAD],
        [PAD, PAD, 8, 9, PAD, 23, 24, 25, 26],
        [10, 11, 12, 13, 27, PAD, PAD, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1],
                                             [1, 1, 1, 1, 1, 0, 0, 0, 0]]
    # masks from lengths, never from ids: the sampled pad token in row 1 counts
    assert batch.mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch.lengths.tolist() == [3, 5, 1] and batch.finished.tolist() == [True, False, False]
    assert batch.position_ids[1].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert batch.rollout_logprobs[2].tolist() == [-0.5, 0, 0, 0, 0]
    sub = batch.rows(torch.tensor([2, 0]))
    assert sub.input_ids[1].tolist() == batch.input_ids[0].tolist() and sub.prompt_width == 4
    assert sub.finished.tolist() == [False, True]


def test_from_samples_renders_prompts_like_every_backend():
    class Tokenizer:
        pad_token_id = PAD

        def apply_chat_template(self, conversation, add_generation_prompt, tokenize):
            return [3] * len(conversation[0]["content"])

    samples = [Sample("a", [20, 1], [-1.0, -2.0], "stop"), Sample("b", [21, 22, 23], [-1.0] * 3, "length")]
    prompts = [[{"role": "user", "content": "xy"}], [{"role": "user", "content": "xyz"}]]
    batch = ppo.RolloutBatch.from_samples(Tokenizer(), prompts, samples)
    assert batch.input_ids.tolist() == [[PAD, 3, 3, 20, 1, PAD], [3, 3, 3, 21, 22, 23]]
    assert batch.finished.tolist() == [True, False] and batch.lengths.tolist() == [2, 3]


def test_token_logprobs_equal_completion_logprobs():
    model = micro_policy()
    batch = ppo.RolloutBatch.from_ids(PROMPTS, RESPONSES, PAD)
    ours = ppo.token_logprobs(model, batch, batch_size=2)
    theirs = logprobs.completion_logprobs(model, PROMPTS, RESPONSES, PAD)
    for row, expected in enumerate(theirs):
        torch.testing.assert_close(ours[row, : len(expected)], torch.tensor(expected), atol=1e-5, rtol=0)
    assert (ours * (1 - batch.mask)).abs().sum() == 0  # 0 on padding


def test_token_logprobs_scale_logits_by_the_temperature_and_carry_gradient():
    model = micro_policy()
    batch = ppo.RolloutBatch.from_ids(PROMPTS[:1], RESPONSES[:1], PAD)
    logits = model(input_ids=batch.input_ids[:, :-1]).logits[0, 2:5] / 0.7  # no padding: P = 3
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor([[20], [21], [1]])).squeeze(-1)
    scaled = ppo.token_logprobs(model, batch, temperature=0.7, grad=True)
    torch.testing.assert_close(scaled[0], expected.detach(), atol=1e-5, rtol=0)
    scaled.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_values_are_the_score_head_at_the_positions_of_the_logits():
    """V_t reads the hidden state that predicts response token t: the score head on the last
    hidden state of the unpadded prefix prompt + response_<t (column P + t - 1). The head is read
    directly, not through the classifier's pooling, which looks for the last non-pad token and so
    would skip the sampled pad token of row 1."""
    critic = micro_critic()
    batch = ppo.RolloutBatch.from_ids(PROMPTS, RESPONSES, PAD)
    values = ppo.critic_values(critic, batch, batch_size=2)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        for t in range(len(response)):
            prefix = torch.tensor([prompt + response[:t]])
            pooled = critic.score(critic.model(input_ids=prefix).last_hidden_state[0, -1])[0]
            assert values[row, t].item() == pytest.approx(pooled.item(), abs=1e-5), (row, t)
    assert (values * (1 - batch.mask)).abs().sum() == 0


def rollout_inputs(policy, critic, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (int(n),), generator=generator).tolist() for n in torch.randint(2, 6, (8,))]
    responses = [torch.randint(3, VOCAB, (int(n),), generator=generator).tolist() for n in torch.randint(1, 7, (8,))]
    batch = ppo.RolloutBatch.from_ids(prompts, responses, PAD)
    old = ppo.token_logprobs(policy, batch)
    values = ppo.critic_values(critic, batch)
    scores = torch.randn(8, generator=generator)
    rewards = ppo_math.shape_rewards(scores, torch.zeros_like(old), batch.mask, 0.0)
    advantages, returns = ppo_math.gae(rewards, values, batch.mask, 1.0, 0.95)
    return batch, old, values, ppo_math.masked_whiten(advantages, batch.mask), returns


def test_first_step_has_ratio_one_and_the_permutation_is_injectable():
    policy, critic = micro_policy(), micro_critic()
    orders = []

    def permutation(n):
        order = list(reversed(range(n)))
        orders.append(order)
        return order

    settings = ppo.PPOSettings(num_ppo_epochs=2, num_mini_batches=2, micro_batch_size=3)
    updater = ppo.PPOUpdater(policy, critic, settings, policy_lr=1e-2, critic_lr=1e-2, permutation=permutation)
    steps = updater.update(*rollout_inputs(policy, critic))
    assert len(steps) == 4 and len(orders) == 2 and updater.steps == 4
    assert steps[0]["val/ratio"] == pytest.approx(1.0, abs=1e-6) and steps[0]["policy/clipfrac_avg"] == 0.0
    assert steps[0]["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-7)
    assert steps[-1]["val/ratio"] != pytest.approx(1.0, abs=1e-6)  # the policy moved
    assert updater.policy_optimizer.defaults["eps"] == 1e-5 and updater.critic_optimizer.defaults["eps"] == 1e-5
    assert all(row["grad_norm/policy"] > 0 and row["grad_norm/critic"] > 0 for row in steps)


def test_micro_batches_accumulate_the_minibatch_token_mean():
    """The same update in micro-batches of 1 row and in one piece gives the same parameters."""
    results = []
    for micro in (1, 8):
        policy, critic = micro_policy(), micro_critic()
        settings = ppo.PPOSettings(num_ppo_epochs=1, num_mini_batches=1, micro_batch_size=micro, max_grad_norm=None)
        updater = ppo.PPOUpdater(policy, critic, settings, 0.0, 0.0, permutation=lambda n: list(range(n)),
                                 policy_optimizer=torch.optim.SGD(ppo.trainable(policy), lr=0.1),
                                 critic_optimizer=torch.optim.SGD(ppo.trainable(critic), lr=0.1))
        updater.update(*rollout_inputs(policy, critic))
        results.append((policy.state_dict(), critic.state_dict()))
    (policy_a, critic_a), (policy_b, critic_b) = results
    for name in policy_a:
        torch.testing.assert_close(policy_a[name], policy_b[name], atol=1e-6, rtol=0)
    for name in critic_a:
        torch.testing.assert_close(critic_a[name], critic_b[name], atol=1e-6, rtol=0)


def test_gradient_clipping_bounds_each_model_apart():
    policy, critic = micro_policy(), micro_critic()
    settings = ppo.PPOSettings(num_ppo_epochs=1, num_mini_batches=1, max_grad_norm=1e-3)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    updater = ppo.PPOUpdater(policy, critic, settings, 0.0, 0.0,
                             policy_optimizer=torch.optim.SGD(ppo.trainable(policy), lr=1.0),
                             critic_optimizer=torch.optim.SGD(ppo.trainable(critic), lr=1.0))
    (step,) = updater.update(*rollout_inputs(policy, critic))
    assert step["grad_norm/policy"] > 1e-3  # the norm reported is the one before clipping
    moved = torch.sqrt(sum(((p.detach() - before[name]) ** 2).sum() for name, p in policy.named_parameters()))
    assert moved.item() == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1 moves by exactly the clipped norm


def test_value_loss_falls_on_a_frozen_batch():
    """A critic-only fit (the policy frozen: critic warm-up) on one rollout batch: 20 steps at
    least halve the value loss."""
    policy, critic = micro_policy(), micro_critic()
    batch, old, values, advantages, returns = rollout_inputs(policy, critic)
    settings = ppo.PPOSettings(num_ppo_epochs=1, num_mini_batches=1, cliprange_value=100.0, vf_coef=1.0)
    updater = ppo.PPOUpdater(policy, critic, settings, policy_lr=1e-2, critic_lr=3e-3)
    policy_before = [p.detach().clone() for p in policy.parameters()]
    policy_calls = []
    policy.register_forward_hook(lambda *_: policy_calls.append(1))
    losses = [updater.update(batch, old, values, advantages, returns, train_policy=False)[0]["loss/value_avg"]
              for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(a, b.detach()) for a, b in zip(policy_before, policy.parameters()))
    assert policy_calls == []  # its log-probs are the old ones: no forward (and no backward) through the policy


def test_a_critic_warmup_step_moves_the_critic_as_a_full_step_does():
    """The warm-up skips the policy's passes; the critic's step must be the one a full update
    takes (the two models share no weights), and the row reports an unmoved policy."""
    settings = ppo.PPOSettings(num_ppo_epochs=1, num_mini_batches=1, cliprange_value=None, vf_coef=0.5)
    critics = []
    for train_policy in (True, False):
        torch.manual_seed(0)
        policy, critic = micro_policy(), micro_critic()
        inputs = rollout_inputs(policy, critic)
        (row,) = ppo.PPOUpdater(policy, critic, settings, 1e-2, 1e-2).update(*inputs, train_policy=train_policy)
        critics.append(critic)
    for full, warmup in zip(critics[0].parameters(), critics[1].parameters()):
        torch.testing.assert_close(warmup, full, atol=1e-7, rtol=0)
    assert row["val/ratio"] == 1.0 and row["policy/clipfrac_avg"] == 0.0 and row["grad_norm/policy"] == 0.0


def test_sampler_mismatch_is_zero_for_the_trainers_own_logprobs():
    model = micro_policy()
    batch = ppo.RolloutBatch.from_ids(PROMPTS, RESPONSES, PAD)
    old = ppo.token_logprobs(model, batch)
    batch.rollout_logprobs = old.clone()
    stats = ppo.sampler_mismatch(batch, old)
    assert stats["rollout/logprob_abs_diff_max"] == 0 and stats["rollout/vllm_kl"] == 0
    batch.rollout_logprobs = old - 0.1 * batch.mask
    assert ppo.sampler_mismatch(batch, old)["rollout/logprob_abs_diff_mean"] == pytest.approx(0.1, abs=1e-6)


def test_mean_rows_averages_the_minibatch_steps():
    rows = [{"epoch": 0, "minibatch": 0, "loss/policy_avg": 1.0}, {"epoch": 0, "minibatch": 1, "loss/policy_avg": 3.0}]
    assert ppo.mean_rows(rows) == {"loss/policy_avg": 2.0}


def test_the_adapter_disabled_policy_is_the_reference():
    """LoRA over the merged SFT weights: B = 0 gives the reference exactly; a trained adapter moves
    the policy while the adapter-disabled model stays the SFT model."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(micro_policy(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = ppo.RolloutBatch.from_ids(PROMPTS, RESPONSES, PAD)
    reference = ppo.token_logprobs(micro_policy(), batch)  # a separately built copy of the same weights
    torch.testing.assert_close(ppo.token_logprobs(policy, batch), reference, atol=0, rtol=0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    assert (ppo.token_logprobs(policy, batch) - reference).abs().max() > 1e-3
    with logprobs.adapters_disabled(policy):
        torch.testing.assert_close(ppo.token_logprobs(policy, batch), reference, atol=1e-6, rtol=0)


def test_a_lora_critic_reads_its_own_trained_score_head():
    from peft import LoraConfig, get_peft_model

    plain = micro_critic()
    critic = get_peft_model(micro_critic(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj"], modules_to_save=["score"]))
    batch = ppo.RolloutBatch.from_ids(PROMPTS, RESPONSES, PAD)
    torch.testing.assert_close(ppo.critic_values(critic, batch), ppo.critic_values(plain, batch), atol=1e-6, rtol=0)
    assert any("score" in name for name, p in critic.named_parameters() if p.requires_grad)
    settings = ppo.PPOSettings(num_ppo_epochs=1, num_mini_batches=1, cliprange_value=100.0, vf_coef=1.0)
    policy = micro_policy()
    ppo.PPOUpdater(policy, critic, settings, 0.0, 1e-2).update(*rollout_inputs(policy, critic), train_policy=False)
    assert (ppo.critic_values(critic, batch) - ppo.critic_values(plain, batch)).abs().max() > 1e-4
