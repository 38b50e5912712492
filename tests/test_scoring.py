"""THE scoring layout: one (prompt, response) gets the same score through TRL's
RewardTrainer (its own tokenization and collated batch), through RewardScorer,
and through the merged checkpoint saved and reloaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from align import data
from align.models import load_tokenizer
from align.preferences import ranked_to_pairs
from align.scoring import RewardScorer, reward_dataset, reward_ids, reward_text, score_texts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_layout_ends_exactly_at_end_of_turn(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I boil an egg?"}]
    text = reward_text(tokenizer, prompt, "Boil it for 9 minutes.\n")
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "Boil it for 9 minutes.\n"}],
                                         tokenize=False)
    assert full.endswith("<|im_end|>\n")  # ChatML's newline after the turn...
    assert text == full[: -len("\n")]  # ...is the only thing the layout removes
    ids = reward_ids(tokenizer, text)
    assert ids[-1] == tokenizer.eos_token_id  # the score is read at <|im_end|>
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # no special token added
    assert tokenizer.pad_token_id not in ids and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_trainer_scorer_and_saved_checkpoint_agree(tiny_model_dir, tiny_data, tokenizer, tmp_path):
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    from align.training import save_peft_outputs

    pairs, _ = ranked_to_pairs(data.load_ranked(tiny_data["ranked"]))
    pairs = pairs[:12]
    config = RewardConfig(output_dir=str(tmp_path / "trainer"), use_cpu=True, bf16=False, max_steps=3,
                          learning_rate=0.01, per_device_train_batch_size=4, gradient_checkpointing=False,
                          report_to=[], save_strategy="no", logging_steps=1, seed=0)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["score"])
    trainer = RewardTrainer(model=str(tiny_model_dir), args=config, train_dataset=reward_dataset(tokenizer, pairs),
                            processing_class=tokenizer, peft_config=lora)

    # 1. TRL tokenized exactly our layout: no eos appended, nothing prepended.
    texts = [reward_text(tokenizer, p["prompt"], p["chosen"]) for p in pairs]
    texts += [reward_text(tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    trl_ids = list(trainer.train_dataset["chosen_ids"]) + list(trainer.train_dataset["rejected_ids"])
    assert trl_ids == [reward_ids(tokenizer, text) for text in texts]
    assert trainer.model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id

    trainer.train()  # move the LoRA weights and the score head away from their initial values
    model = trainer.model.eval()

    # 2. The trainer's own collated batch through the model (what the loss saw).
    import torch

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    trainer_scores = logits.tolist()  # chosen first, then rejected, as the collator orders them

    # 3. score_texts with the in-memory model, other batch sizes and padding.
    assert score_texts(model, tokenizer, texts, batch_size=5) == pytest.approx(trainer_scores, abs=1e-4)

    # 4. Saved (adapter merged) and reloaded through RewardScorer, from (prompt, response).
    out = SimpleNamespace(path=tmp_path, model_dir=tmp_path / "model")
    save_peft_outputs(model, tokenizer, out)
    scorer = RewardScorer(tmp_path / "model", batch_size=3)
    chosen, rejected = scorer.score_pairs(pairs)
    assert chosen + rejected == pytest.approx(trainer_scores, abs=1e-4)
    assert len(set(round(s, 3) for s in trainer_scores)) > 2  # real, varied scores, not a constant

    # Negative control: the layout matters. The same text with ChatML's trailing newline
    # is read at a different token and scores differently.
    shifted = scorer.model(**tokenizer([texts[0] + "\n"], return_tensors="pt")).logits[0, 0].item()
    assert abs(shifted - trainer_scores[0]) > 1e-3


def test_scorer_refuses_adapter_folders_and_non_models(tmp_path):
    from align.errors import AlignError

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AlignError, match="LoRA adapter"):
        RewardScorer(tmp_path)
    with pytest.raises(AlignError, match="no config.json"):
        RewardScorer(tmp_path / "nothing")
