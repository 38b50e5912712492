"""align.cost: model FLOPs per phase, this machine's matmul peak, and the counts the shared layers
(generation, reward scoring, log-prob passes, Trainers) put into the open phase."""

from __future__ import annotations

import pytest

from align import cost


@pytest.fixture
def ledger(monkeypatch):
    """A fresh process ledger: the counting functions write to cost.LEDGER."""
    fresh = cost.Ledger()
    monkeypatch.setattr(cost, "LEDGER", fresh)
    return fresh


def test_flops_per_token_formulas():
    lora = cost.Sizes(forward=100, head=20, backward=60, trainable=5)
    assert cost.forward_flops(lora, 3) == 600  # 2F per token
    assert cost.forward_flops(lora, 3, headless_tokens=2) == 600 - 2 * 20 * 2  # no logits at 2 positions
    assert cost.training_flops(lora, 2) == 2 * (200 + 120 + 10)  # 2F + 2B + 2T
    full = cost.Sizes(forward=100, head=20, backward=100, trainable=100)
    assert cost.training_flops(full, 1) == 600  # full fine-tuning: 6F


def test_counts_go_to_the_innermost_open_phase_else_other(ledger):
    one = cost.Sizes(forward=10, head=0, backward=10, trainable=1)
    cost.count_forward(one, 1)  # nothing open
    with cost.phase("eval"):
        cost.count_forward(one, 2)
        with cost.phase("score"):
            cost.count_forward(one, 3)
        cost.count_training(one, 1)
    assert dict(ledger.tokens) == {"other": 1, "eval": 3, "score": 3}
    assert ledger.flops["eval"] == 2 * 10 * 2 + (20 + 20 + 2) and ledger.flops["score"] == 60 and ledger.flops["other"] == 20
    assert ledger.seconds["eval"] >= ledger.seconds["score"] > 0


def test_report_divides_by_the_phase_time_and_the_peak_of_its_dtype(ledger):
    with cost.phase("train"):
        cost.count_training(cost.Sizes(forward=1000, head=0, backward=1000, trainable=0), 50)  # 200,000 FLOPs
    with cost.phase("score"):
        cost.count_forward(cost.Sizes(forward=1000, head=0, backward=0, trainable=0), 25)  # 50,000 FLOPs
    peaks = {"bfloat16": 1e6, "float32": 2.5e5}
    report = cost.report("bfloat16", seconds={"train": 0.5, "score": 1.0, "sync": 3.0},
                         phase_dtypes={"score": "float32"}, peaks=peaks)
    train, score, total = (report["phases"][name] for name in ("train", "score", "total"))
    assert train["flops_per_s"] == pytest.approx(4e5) and train["peak_fraction"] == pytest.approx(0.4)
    assert score["dtype"] == "float32" and score["peak_fraction"] == pytest.approx(5e4 / 2.5e5)
    # the total: every counted FLOP over the counted phases' time (sync counted nothing), against the stage's dtype
    assert total["flops"] == 250_000 and total["seconds"] == 1.5 and total["tokens"] == 75
    assert total["peak_fraction"] == pytest.approx(250_000 / 1.5 / 1e6)
    assert "sync" not in report["phases"]
    text = cost.summary_text(report)
    assert text == "train 0.00 TFLOP at 40% | score 0.00 TFLOP at 20% (fp32) | total 0.00 TFLOP at 17% of peak (bf16 0, fp32 0 GFLOP/s)"


def test_padding_is_reported_where_a_trainer_counted_its_batch_positions(ledger):
    """Positions computed per real token, less one; phases whose batches nobody counted say nothing."""
    one = cost.Sizes(forward=1000, head=0, backward=0, trainable=0)
    with cost.phase("train"):
        cost.count_forward(one, 100)
        cost.count_positions(141, 100)
    with cost.phase("score"):
        cost.count_forward(one, 50)
    report = cost.report("float32", seconds={"train": 1.0, "score": 1.0}, peaks={"float32": 1e6})
    train, score, total = (report["phases"][name] for name in ("train", "score", "total"))
    assert train["positions"] == 141 and train["padding"] == pytest.approx(0.41)
    assert "padding" not in score and "padding" not in total
    assert cost.summary_text(report).startswith("train 0.00 TFLOP at 20% (+41% padding) | score 0.00 TFLOP at 10% |")


def test_padding_leaves_out_passes_whose_batches_were_not_counted(ledger):
    """DPO's train phase also holds TRL's precomputed reference log-probs (real tokens, no positions
    counted): the padding figure compares the trainer's positions with the trainer's own tokens. Counted
    against every token of the phase, this read -25% padding on the main job."""
    one = cost.Sizes(forward=1000, head=0, backward=0, trainable=0)
    with cost.phase("train"):
        cost.count_forward(one, 100)  # the reference pass over the same pairs
        cost.count_forward(one, 100)  # the trainer's own pass
        cost.count_positions(150, 100)
    report = cost.report("float32", seconds={"train": 1.0}, peaks={"float32": 1e6})
    train = report["phases"]["train"]
    assert train["tokens"] == 200 and train["padding"] == pytest.approx(0.5)


def test_a_stage_that_counted_nothing_says_so(ledger):
    """The openai backend samples in a server: no FLOPs here, and the summary says so, not '0%'."""
    report = cost.report("float32", seconds={"generate": 2.0}, peaks={"float32": 1.0})
    assert report["phases"] == {} and cost.summary_text(report) == "none counted here (a server generated)"


def test_one_phase_has_no_separate_total(ledger):
    with cost.phase("train"):
        cost.count_forward(cost.Sizes(1, 0, 0, 0), 1)
    assert list(cost.report("float32", peaks={"float32": 1.0})["phases"]) == ["train"]


def test_matmul_peak_keeps_the_best_measurement_on_record(monkeypatch, tmp_path):
    """A peak measured while other work shared the cores is low: later measurements replace it."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    measured = iter([100e9, 123e9, 90e9])
    monkeypatch.setattr(cost, "measure_matmul_peak", lambda dtype, seconds: next(measured))
    assert [cost.matmul_peak("float32") for _ in range(3)] == [100e9, 123e9, 123e9]
    assert "fp32 123 GFLOP/s" in cost.peak_line()


def test_a_measured_matmul_peak_is_a_plausible_rate():
    flops_per_s = cost.measure_matmul_peak("float32", size=256, seconds=0.2)
    assert 1e8 < flops_per_s < 1e14  # a CPU core does 0.1 GFLOP/s to 100 TFLOP/s


def test_sizes_of_a_causal_lm_a_classifier_and_top_layer_lora(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from align.models import load_causal_lm

    causal = load_causal_lm(str(tiny_model_dir))
    every = sum(p.numel() for p in causal.parameters())
    vocabulary = causal.get_input_embeddings().weight.numel()
    assert causal.config.tie_word_embeddings  # the embedding is the lm_head: a matmul per token
    assert cost.sizes(causal) == cost.Sizes(forward=every, head=vocabulary, backward=every, trainable=every)
    frozen = cost.checkpoint_sizes(tiny_model_dir)
    assert (frozen.forward, frozen.head, frozen.backward, frozen.trainable) == (every, vocabulary, 0, 0)
    assert cost.checkpoint_sizes("HuggingFaceTB/not-a-folder") is None

    config = causal.config.__class__.from_dict({**causal.config.to_dict(), "num_labels": 1})
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
    body = sum(p.numel() for p in classifier.parameters()) - vocabulary  # the embedding is only looked up
    assert cost.sizes(classifier) == cost.Sizes(forward=body, head=0, backward=body, trainable=body)

    # LoRA in the top layer only: the backward runs from there up; the weight gradients are the adapter's
    top = get_peft_model(causal, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    sizes = cost.sizes(top)
    adapter = sum(p.numel() for p in top.parameters() if p.requires_grad)
    layer_one = sum(p.numel() for name, p in top.named_parameters() if ".layers.1." in name)
    norm = top.get_base_model().model.norm.weight.numel()
    assert sizes.trainable == adapter and sizes.forward == every + adapter and sizes.head == vocabulary
    # from the lowest adapter (layer 1's q_proj lora_A) up, in registration order: all of layer 1
    # but the q_proj base weight registered before it (its norms register after its attention: a
    # 128-parameter overcount), the final norm, and the tied head
    below_in_layer = sum(p.numel() for name, p in top.named_parameters()
                         if name.endswith("layers.1.self_attn.q_proj.base_layer.weight"))
    assert sizes.backward == layer_one - below_in_layer + norm + vocabulary


def test_generation_counts_every_prefill_and_every_sampled_token(ledger, tiny_model_dir):
    """transformers prefills each prompt once per sample (num_return_sequences), logits only at
    the last prompt position; each sampled token is one more forward."""
    from align.generation import SamplingSettings, create_generator, render_prompts

    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "How long do I boil an egg?"}]]
    with create_generator(str(tiny_model_dir), "hf", "fp32") as generator, cost.phase("generate"):
        samples = generator.generate(prompts, SamplingSettings(n=3, temperature=1.0, max_new_tokens=7, seed=1))
        prompt_tokens = 3 * sum(len(ids) for ids in render_prompts(generator.tokenizer, prompts))
    sampled = sum(len(s.token_ids) for group in samples for s in group)
    sizes = cost.checkpoint_sizes(tiny_model_dir)
    assert ledger.tokens["generate"] == prompt_tokens + sampled
    assert ledger.flops["generate"] == (2 * sizes.forward * (prompt_tokens + sampled)
                                        - 2 * sizes.head * (prompt_tokens - 3 * len(prompts)))


def test_a_trainer_counts_real_tokens_not_padding(ledger, tiny_model_dir, tmp_path):
    """A real transformers Trainer, set up by fit_to_hardware, on rows of known lengths padded in
    batches of 2: the ledger gets (2F + 2B + 2T) FLOPs per real token, padding left out."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from align import training
    from align.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    for name, parameter in model.named_parameters():  # train the last norm alone
        parameter.requires_grad = name == "model.norm.weight"
    lengths = [5, 9, 3, 7]
    rows = Dataset.from_list([{"input_ids": list(range(1000, 1000 + n))} for n in lengths])
    args = training.fit_to_hardware(TrainingArguments(per_device_train_batch_size=2, num_train_epochs=1,
                                                      train_sampling_strategy="sequential", report_to="none"),
                                    "fp32", tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    with cost.phase("train"), training.counted(trainer, reference_forward=True):
        trainer.train()
    every = sum(p.numel() for p in model.parameters())
    norm, head = model.config.hidden_size, model.get_output_embeddings().weight.numel()
    assert ledger.tokens["train"] == 2 * sum(lengths)  # the training pass, then the reference forward
    # backward: from the final norm up (norm and the tied head); the weight gradient: the norm's
    assert ledger.flops["train"] == 2 * (every + (norm + head) + norm) * 24 + 2 * every * 24
    # the padded batches [5, 9] and [3, 7] hold 2 x 9 + 2 x 7 positions, computed by both passes
    assert ledger.positions["train"] == 2 * (2 * 9 + 2 * 7)
    assert ledger.positioned_tokens["train"] == 2 * sum(lengths)
    assert trainer.data_collator.__class__ is DataCollatorForLanguageModeling  # the wrapper is gone again
