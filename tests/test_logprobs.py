"""align.logprobs: completion log-probabilities (padding, reference via disabled adapters) and KL estimators."""

from __future__ import annotations

import math
import random

import pytest

from align import logprobs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from align.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


def _unpadded_logprobs(model, prompt, completion):
    """One row, no padding, full logits: the plain definition."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    steps = torch.log_softmax(logits, dim=-1)
    return [steps[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion)]


def test_batched_left_padded_rows_match_one_row_at_a_time(tiny):
    from align.generation import render_prompts

    model, tokenizer = tiny
    conversations = [[{"role": "user", "content": text}] for text in
                     ("Hi", "How long do I boil an egg for a soft yolk?", "Salt?")]
    prompts = render_prompts(tokenizer, conversations)
    rng = random.Random(0)
    completions = [[rng.randrange(1000, 40000) for _ in range(n)] + [tokenizer.eos_token_id] for n in (1, 9, 4)]
    batched = logprobs.completion_logprobs(model, prompts, completions, tokenizer.pad_token_id, batch_size=3)
    for prompt, completion, row in zip(prompts, completions, batched):
        expected = _unpadded_logprobs(model, prompt, completion)
        assert len(row) == len(completion)
        assert row == pytest.approx(expected, abs=1e-4)
    sums = logprobs.sequence_logprobs(batched)
    assert sums[1] == pytest.approx(sum(batched[1]))
    assert all(s < 0 for s in sums)


def test_agrees_with_the_generation_layer_sample_logprobs(tiny_model_dir, tiny):
    """Samples from the hf backend carry the sampler's logprobs; re-scoring them must give the same numbers."""
    from align.generation import SamplingSettings, create_generator, render_prompts

    model, tokenizer = tiny
    conversations = [[{"role": "user", "content": "How do I store rice?"}], [{"role": "user", "content": "Eggs?"}]]
    with create_generator(str(tiny_model_dir), backend="hf", dtype="fp32", quiet=True) as generator:
        samples = generator.generate(conversations, SamplingSettings(n=2, max_new_tokens=8, seed=1))
    flat = [(conversation, s) for conversation, group in zip(conversations, samples) for s in group]
    prompts = render_prompts(tokenizer, [c for c, _ in flat])
    scored = logprobs.completion_logprobs(model, prompts, [s.token_ids for _, s in flat], tokenizer.pad_token_id)
    for (_, sample), row in zip(flat, scored):
        assert row == pytest.approx(sample.logprobs, abs=1e-3)


def test_adapters_disabled_gives_the_base_model(tiny_model_dir, tiny):
    import torch
    from peft import LoraConfig, get_peft_model

    from align.models import load_causal_lm

    base_model, tokenizer = tiny
    peft_model = get_peft_model(load_causal_lm(str(tiny_model_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained-looking adapter: LoRA B starts at zero, which would change nothing
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    prompt = [[tokenizer.bos_token_id or 1, 300, 400, 500]]
    completion = [[600, 700, tokenizer.eos_token_id]]
    pad = tokenizer.pad_token_id
    base = logprobs.completion_logprobs(base_model, prompt, completion, pad)
    adapted = logprobs.completion_logprobs(peft_model, prompt, completion, pad)
    with logprobs.adapters_disabled(peft_model):
        reference = logprobs.completion_logprobs(peft_model, prompt, completion, pad)
    assert reference[0] == pytest.approx(base[0], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(adapted[0], base[0])) > 1e-3
    # and outside the context the adapter is back
    assert logprobs.completion_logprobs(peft_model, prompt, completion, pad)[0] == pytest.approx(adapted[0], abs=1e-5)


def test_kl_estimators_are_zero_for_identical_models_and_unbiased():
    same = [[-1.0, -2.0], [-0.5]]
    assert logprobs.kl_per_sequence(same, same, "k1") == [0.0, 0.0]
    assert logprobs.kl_per_sequence(same, same, "k3") == [0.0, 0.0]

    # Samples from p over 3 outcomes; the estimators' means approach the exact KL(p || q).
    p, q = [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    rng = random.Random(0)
    draws = rng.choices(range(3), weights=p, k=20000)
    policy = [[math.log(p[x])] for x in draws]
    reference = [[math.log(q[x])] for x in draws]
    for estimator in ("k1", "k3"):
        summary = logprobs.kl_summary(policy, reference, estimator)
        assert summary["kl"] == pytest.approx(exact, rel=0.05), estimator
        assert summary["kl_per_token"] == pytest.approx(summary["kl"])
    assert min(logprobs.kl_per_sequence(policy, reference, "k3")) >= 0.0
    assert min(logprobs.kl_per_sequence(policy, reference, "k1")) < 0.0  # k1 can go negative per sample
    with pytest.raises(ValueError, match="estimator"):
        logprobs.kl_per_sequence(policy, reference, "k2")
    with pytest.raises(ValueError, match="token counts"):
        logprobs.kl_per_sequence([[-1.0]], [[-1.0, -2.0]])


def test_length_sorted_batches_cover_every_row_once_longest_first():
    from align.logprobs import length_sorted_batches

    lengths = [5, 120, 7, 64, 3, 250, 64]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [[lengths[i] for i in batch] for batch in batches] == [[250, 120, 64], [64, 7, 5], [3]]


def test_a_model_prepared_by_accelerate_in_bf16_is_still_scored_in_its_own_dtype(tiny_model_dir):
    """Every TRL trainer prepares its model with accelerate, which under bf16 mixed precision wraps
    the instance's `forward` in autocast; the stages' held-out KL read ~20% low through it. Scoring
    must give the plain model's numbers, also after a second preparation (one per on-policy round),
    and leave the trainer's wrapper in place."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from align.generation import render_prompts
    from align.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    plain, prepared = load_causal_lm(str(tiny_model_dir)).eval(), load_causal_lm(str(tiny_model_dir)).eval()
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": "How long do I boil an egg?"}],
                                         [{"role": "user", "content": "Salt?"}]])
    rng = random.Random(1)
    completions = [[rng.randrange(1000, 40000) for _ in range(n)] for n in (12, 5)]
    try:
        for _ in range(2):
            Accelerator(cpu=True, mixed_precision="bf16").prepare_model(prepared)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    wrapped_forward = prepared.forward
    ids = torch.tensor([prompts[0] + completions[0]])
    with torch.no_grad():  # the wrapper is there and really changes the numbers: the test can fail
        assert not torch.allclose(prepared(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4)

    expected = logprobs.completion_logprobs(plain, prompts, completions, tokenizer.pad_token_id)
    scored = logprobs.completion_logprobs(prepared, prompts, completions, tokenizer.pad_token_id)
    for row, want in zip(scored, expected):
        assert row == pytest.approx(want, abs=1e-5)
    assert prepared.forward == wrapped_forward and "_original_forward" in vars(prepared)
