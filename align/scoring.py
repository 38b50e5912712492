"""THE token layout a reward model scores, and the scorer every stage uses.

A reward model reads its score at the last non-pad token of a sequence, so the
exact layout matters: train on one layout and score another (an extra newline,
a missing end-of-turn token) and the model reads a position it never learned
from. One function, `reward_text`, renders (prompt, response) for training,
evaluation and every later stage; `tests/test_scoring.py` proves the scores
agree through all of them.

The layout: the tokenizer's chat template over prompt + the assistant response,
ending with the end-of-turn token (eos, `<|im_end|>` for SmolLM2) and nothing
after it. ChatML renders a newline after every `<|im_end|>`; we drop the one
after the final turn because

- the score then sits on `<|im_end|>`, the token that closes the response, the
  same token a policy emits when it stops: a rollout rendered as prompt +
  generated text + eos has exactly this layout;
- TRL 1.16's RewardTrainer, given plain-text `chosen`/`rejected` columns,
  appends eos unless the text already ends with it, then tokenizes with
  `tokenizer(text)` (SmolLM2's tokenizer adds no BOS). A text ending in
  `<|im_end|>` passes through unchanged; one ending in `<|im_end|>\\n` would get
  a second eos. So the trainer is fed `reward_text` output as standard text and
  `reward_ids` tokenizes it the same way here.
"""

from __future__ import annotations

from pathlib import Path

from align import cost
from align.errors import AlignError
from align.logprobs import length_sorted_batches


def reward_text(tokenizer, prompt_messages: list[dict], response: str) -> str:
    """Prompt + assistant response, rendered by the chat template, ending exactly at eos."""
    messages = [*prompt_messages, {"role": "assistant", "content": response}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    eos = tokenizer.eos_token
    end = rendered.rfind(eos)
    if end < 0 or rendered[end + len(eos):].strip():
        raise AlignError(
            f"chat template does not close the assistant turn with eos {eos!r}; "
            "the reward layout needs an end-of-turn token to read the score at"
        )
    return rendered[: end + len(eos)]


def reward_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a `reward_text`, tokenized as TRL's RewardTrainer does (`tokenizer(text)`)."""
    return tokenizer(text)["input_ids"]


def reward_dataset(tokenizer, pairs: list[dict], use_margin: bool = False, response_lengths: bool = False):
    """A TRL RewardTrainer dataset: plain-text chosen/rejected in THE layout (TRL adds nothing
    to a text that already ends with eos), plus `margin` when asked (TRL subtracts it in the loss),
    and `length`: the longer side's tokens, which TRL's collator pads both sides to, for
    transformers' length-grouped sampler (`train_sampling_strategy: group_by_length`).
    `response_lengths`: also `chosen_tokens` and `rejected_tokens`, each answer's own length
    (response_length, as the gate counts it) for align.length_bias's loss term."""
    from datasets import Dataset

    rows = {
        "chosen": [reward_text(tokenizer, pair["prompt"], pair["chosen"]) for pair in pairs],
        "rejected": [reward_text(tokenizer, pair["prompt"], pair["rejected"]) for pair in pairs],
    }
    rows["length"] = [max(len(reward_ids(tokenizer, chosen)), len(reward_ids(tokenizer, rejected)))
                      for chosen, rejected in zip(rows["chosen"], rows["rejected"])]
    if use_margin:
        rows["margin"] = [float(pair["margin"]) for pair in pairs]
    if response_lengths:
        for side in ("chosen", "rejected"):
            rows[f"{side}_tokens"] = [response_length(tokenizer, pair[side]) for pair in pairs]
    return Dataset.from_dict(rows)


def response_length(tokenizer, response: str) -> int:
    """Length of a response in tokens (for the length-bias check)."""
    return len(tokenizer(response, add_special_tokens=False)["input_ids"])


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 8, progress: str | None = None) -> list[float]:
    """Scores of already-rendered reward texts with an in-memory sequence-classification model."""
    import torch

    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise AlignError("reward scoring needs a pad token distinct from eos (use align.models.load_tokenizer)")
    if model.config.pad_token_id != tokenizer.pad_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id  # the model locates the last non-pad token with it
    device = next(model.parameters()).device
    all_ids = [reward_ids(tokenizer, text) for text in texts]
    batches = length_sorted_batches([len(ids) for ids in all_ids], batch_size)  # little padding
    cost.count_forward(cost.sizes(model), sum(len(ids) for ids in all_ids))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=progress, unit="batch")
    scores: list[float | None] = [None] * len(texts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for indices in batches:
                batch = tokenizer.pad({"input_ids": [all_ids[i] for i in indices]}, padding=True,
                                      return_tensors="pt").to(device)
                logits = model(**batch).logits
                for index, score in zip(indices, logits[:, 0].float().tolist()):
                    scores[index] = score
    finally:
        model.train(was_training)
    return scores


class RewardScorer:
    """A reward model folder (merged, Hugging Face format) that scores (prompt, response) pairs."""

    def __init__(self, model_dir: str | Path, batch_size: int = 8, dtype: str = "float32", device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from align.models import load_tokenizer

        if dtype not in ("float32", "bfloat16", "float16"):
            raise AlignError(f"score dtype: expected float32, bfloat16 or float16, got {dtype!r}")
        model_dir = Path(model_dir)
        if (model_dir / "adapter_config.json").exists():
            raise AlignError(f"{model_dir}: holds a LoRA adapter; point at the merged model folder (model/)")
        if not (model_dir / "config.json").is_file():
            raise AlignError(f"{model_dir}: not a model folder (no config.json); expected runs/<run>/reward/model")
        self.model_dir, self.dtype = model_dir, dtype  # dtype: what the weights are in ("bfloat16", ...)
        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        if self.model.config.num_labels != 1:
            raise AlignError(f"{model_dir}: num_labels is {self.model.config.num_labels}, a reward model has 1 "
                             "(one score per text); point at a reward stage's model (make reward)")
        if device:
            self.model.to(device)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.batch_size = batch_size
        self.checkpoint = None  # set by load_reward_checkpoint

    def text(self, prompt_messages: list[dict], response: str) -> str:
        return reward_text(self.tokenizer, prompt_messages, response)

    def score(self, prompts: list[list[dict]], responses: list[str], progress: str | None = None) -> list[float]:
        """One score per (prompt messages, response)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [self.text(prompt, response) for prompt, response in zip(prompts, responses)]
        return score_texts(self.model, self.tokenizer, texts, self.batch_size, progress)

    def score_pairs(self, pairs: list[dict], progress: str | None = None) -> tuple[list[float], list[float]]:
        """(chosen scores, rejected scores) for pairs in the `align.preferences` format."""
        prompts = [pair["prompt"] for pair in pairs]
        both = self.score(prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], progress)
        return both[: len(pairs)], both[len(pairs) :]


def effective_reward(score: float, finish_reason: str, truncation_penalty: float) -> float:
    """THE rule for an answer cut at the length cap (`finish_reason == "length"`): it scores
    `truncation_penalty` below what the reward model says.

    The reward layout closes every text with the end-of-turn token, so the reward model
    reads a cut answer as if it had ended there: an unfinished answer would be judged as a
    finished one. Every stage that compares scores (on-policy rounds, held-out evaluation,
    compare, candidate suggestions; PPO's missing-EOS penalty) applies this one rule."""
    return score - truncation_penalty if finish_reason == "length" else score


def load_reward_checkpoint(
    run: str, gate_policy: str = "warn", explicit: str | None = None, **scorer_args
) -> RewardScorer:
    """The reward model of `run` (or the folder `explicit`), checked against its quality gate.

    `gate_policy`: warn (print loudly, go on) or refuse (raise) when the model failed its gate."""
    from align import runs

    if gate_policy not in ("warn", "refuse"):
        raise AlignError(f"reward_gate_policy: expected warn or refuse, got {gate_policy!r}")
    checkpoint = runs.find_checkpoint(run, ["reward"], explicit)
    runs.require_parent_gate(checkpoint, gate_policy)
    scorer = RewardScorer(checkpoint.model_path, **scorer_args)
    scorer.checkpoint = checkpoint
    return scorer
