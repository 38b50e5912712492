"""The pieces of DPO training: pairs for TRL, rounds of on-policy sampling, evaluation of fresh samples.

On-policy DPO (one round):

    samples = generator.generate(train prompts, n=K)        # the current policy, via align.generation
    scores  = scorer.score(prompts, samples)                # THE reward layout (align.scoring)
    pairs   = select_pairs(...)                             # best vs worst, if the score gap >= min margin
    trainer.train_round(pairs)                              # TRL DPOTrainer, reference = adapter-disabled SFT
    generator.update_weights(trainer.model)                 # the next round samples from the new policy

`select_pairs` and `round_prompts` are pure. `RoundTrainer` keeps one LoRA
adapter across rounds while building a fresh TRL `DPOTrainer` for each round's
pairs (TRL trains on the dataset it was built with): between rounds the
adapter's weights are saved, the LoRA layers are removed (`unload`, no merge,
so the base weights stay the SFT weights = the reference), and the next
trainer wraps the same base model again and gets the saved adapter back.
Passing the trained PeftModel itself to a new DPOTrainer would not do: TRL
then copies the current adapter into a "ref" adapter, i.e. the reference would
move to the previous round's policy. Optimizer state starts fresh each round
(each round is its own DPO problem on new data). With full fine-tuning
(`use_peft: false`) the reference is a separate frozen copy of the SFT model.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

from align import logprobs, style
from align.generation import SamplingSettings, render_prompts

PHASES = ("generate", "score", "train", "sync", "eval")


# ---------------------------------------------------------------------------
# Pure pieces


def round_prompts(prompts: list, round_index: int, per_round: int, seed: int) -> list:
    """The prompts of round `round_index` (0-based): consecutive slices of one seeded shuffle,
    wrapping around, so rounds see different prompts until all were used."""
    if not prompts:
        return []
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    per_round = min(per_round, len(prompts))
    start = (round_index * per_round) % len(prompts)
    picked = [order[(start + i) % len(order)] for i in range(per_round)]
    return [prompts[i] for i in picked]


def select_pairs(prompts: list[list[dict]], responses: list[list[str]], scores: list[list[float]],
                 min_margin: float) -> tuple[list[dict], dict]:  # fmt: skip
    """Best vs worst response of each prompt, kept when their reward gap is at least `min_margin`.

    Identical texts are never paired (a gap between equal texts is scoring noise), nor equal scores.
    Returns (pairs in the `align.preferences` format, counts for the round log)."""
    if not len(prompts) == len(responses) == len(scores):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} response lists, {len(scores)} score lists")
    pairs, small_margin, no_variety = [], 0, 0
    for prompt, texts, values in zip(prompts, responses, scores):
        if len(texts) != len(values):
            raise ValueError(f"{len(texts)} responses but {len(values)} scores for one prompt")
        if len(set(texts)) < 2:
            no_variety += 1
            continue
        best = max(range(len(texts)), key=lambda i: values[i])
        worst = min(range(len(texts)), key=lambda i: values[i])
        margin = values[best] - values[worst]
        if texts[best] == texts[worst] or margin <= 0 or margin < min_margin:  # equal scores: no preference
            small_margin += 1
            continue
        pairs.append({"prompt": prompt, "chosen": texts[best], "rejected": texts[worst], "margin": float(margin),
                      "chosen_score": float(values[best]), "rejected_score": float(values[worst])})  # fmt: skip
    counts = {"prompts": len(prompts), "pairs": len(pairs), "dropped_small_margin": small_margin,
              "dropped_identical": no_variety,
              "pair_margin_mean": statistics.fmean(p["margin"] for p in pairs) if pairs else 0.0}  # fmt: skip
    return pairs, counts


def best_vs_worst(pairs: list[dict]) -> list[dict]:
    """From ranked-data pairs, one per prompt: the pair with the largest rank margin (first on a tie)."""
    best: dict[str, dict] = {}
    for pair in pairs:
        key = json.dumps(pair["prompt"], sort_keys=True)
        if key not in best or pair["margin"] > best[key]["margin"]:
            best[key] = pair
    return list(best.values())


def trainer_examples(pairs: list[dict]) -> list[dict]:
    """TRL's conversational preference format: prompt messages, chosen/rejected assistant turns."""
    return [{"prompt": pair["prompt"], "chosen": [{"role": "assistant", "content": pair["chosen"]}],
             "rejected": [{"role": "assistant", "content": pair["rejected"]}]} for pair in pairs]  # fmt: skip


def last_user_text(prompt: list[dict]) -> str:
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def house_style(prompt: list[dict], text: str) -> float:
    return style.style_score(text, unsafe=style.is_unsafe_prompt(last_user_text(prompt)))


# ---------------------------------------------------------------------------
# Timing


class PhaseTimer:
    """Seconds spent per phase (generate / score / train / sync / eval), summed over rounds."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - started

    def as_metrics(self) -> dict:
        return {f"time_{name}_s": round(self.totals.get(name, 0.0), 2) for name in PHASES}


# ---------------------------------------------------------------------------
# Sampling, scoring, KL


@dataclass
class SampleSet:
    """Fresh samples of a policy on some prompts, with their reward and house-style scores."""

    prompts: list[list[dict]]
    samples: list[list]  # per prompt: list of align.generation.Sample
    scores: list[list[float]] = field(default_factory=list)
    styles: list[list[float]] = field(default_factory=list)
    kl: dict = field(default_factory=dict)

    def texts(self) -> list[list[str]]:
        return [[s.text for s in group] for group in self.samples]

    def flat(self):
        for prompt, group, scores, styles in zip(self.prompts, self.samples, self.scores, self.styles):
            for sample, score, house in zip(group, scores, styles):
                yield prompt, sample, score, house

    def summary(self) -> dict:
        rows = list(self.flat())
        lengths = [len(sample.token_ids) for _, sample, _, _ in rows]
        return {
            "mean_reward": statistics.fmean(score for _, _, score, _ in rows),
            "reward_std": statistics.pstdev([score for _, _, score, _ in rows]),
            "style_score": statistics.fmean(house for _, _, _, house in rows),
            "response_tokens": statistics.fmean(lengths),
            "finished_fraction": statistics.fmean(sample.finish_reason == "stop" for _, sample, _, _ in rows),
            "samples": len(rows),
            **self.kl,
        }

    def records(self, prompt_ids: list[str] | None = None) -> list[dict]:
        """One JSON-able row per sample (for samples/*.jsonl)."""
        out = []
        for index, (prompt, group, scores, styles) in enumerate(zip(self.prompts, self.samples, self.scores,
                                                                    self.styles)):  # fmt: skip
            for sample, score, house in zip(group, scores, styles):
                row = {"prompt": prompt, "response": sample.text, "reward": score, "style_score": house,
                       "tokens": len(sample.token_ids), "finish_reason": sample.finish_reason}  # fmt: skip
                if prompt_ids:
                    row = {"prompt_id": prompt_ids[index], **row}
                out.append(row)
        return out


def sample_and_score(generator, scorer, prompts: list[list[dict]], settings: SamplingSettings,
                     timer: PhaseTimer, progress: str | None = None) -> SampleSet:  # fmt: skip
    with timer.phase("generate"):
        samples = generator.generate(prompts, settings, progress=bool(progress))
    result = SampleSet(prompts, samples)
    with timer.phase("score"):
        flat_prompts = [prompt for prompt, group in zip(prompts, samples) for _ in group]
        flat_texts = [sample.text for group in samples for sample in group]
        flat_scores = scorer.score(flat_prompts, flat_texts, progress=progress and f"{progress}: score")
        position = 0
        for group in samples:
            result.scores.append(flat_scores[position : position + len(group)])
            result.styles.append([house_style(prompts[len(result.styles)], s.text) for s in group])
            position += len(group)
    return result


def measure_kl(model, tokenizer, sample_set: SampleSet, max_samples: int, estimator: str = "k3",
               autocast_bf16: bool = False, batch_size: int = 8, reference_model=None) -> dict:  # fmt: skip
    """KL(policy || reference) on (up to `max_samples` of) the set's samples, which must come from `model`.

    Both sides are computed here, with the same numerics: the policy with its adapter, the
    reference with the adapter disabled (or `reference_model`, for full fine-tuning)."""
    import torch

    rows = [(prompt, sample) for prompt, sample, _, _ in sample_set.flat()][:max_samples]
    if not rows:
        return {}
    prompt_ids = render_prompts(tokenizer, [prompt for prompt, _ in rows])
    completions = [sample.token_ids for _, sample in rows]
    pad = tokenizer.pad_token_id
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    with autocast:
        policy = logprobs.completion_logprobs(model, prompt_ids, completions, pad, batch_size)
        if reference_model is not None:
            reference = logprobs.completion_logprobs(reference_model, prompt_ids, completions, pad, batch_size)
        else:
            with logprobs.adapters_disabled(model):
                reference = logprobs.completion_logprobs(model, prompt_ids, completions, pad, batch_size)
    return logprobs.kl_summary(policy, reference, estimator)


# ---------------------------------------------------------------------------
# Training rounds


class StepLogger:
    """A transformers TrainerCallback: every logged step goes to TensorBoard on one timeline
    across rounds (each round's trainer restarts its step count) and into a list for steps.jsonl."""

    def __init__(self, writer):
        from transformers import TrainerCallback

        self.writer, self.rows, self.offset, self.round = writer, [], 0, 0
        logger = self

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                logger.log(state.global_step, logs or {})

        self.callback = _Callback()

    def start_round(self, round_index: int, offset: int) -> None:
        self.round, self.offset = round_index, offset

    def log(self, step: int, logs: dict) -> None:
        step = self.offset + step
        row = {"round": self.round, "step": step}
        for key, value in logs.items():
            if isinstance(value, (int, float)):
                row[key] = value
                if self.writer is not None:
                    self.writer.add_scalar(f"train/{key}", value, step)
        self.rows.append(row)


class RoundTrainer:
    """TRL DPO on one set of pairs at a time, one policy across rounds (see the module docstring)."""

    def __init__(self, base_model, tokenizer, dpo_config, peft_config, step_logger: StepLogger | None = None,
                 reference_model=None):  # fmt: skip
        self.base_model, self.tokenizer = base_model, tokenizer
        self.dpo_config, self.peft_config = dpo_config, peft_config
        self.step_logger = step_logger
        self.reference_model = reference_model  # full fine-tuning only
        self.adapter_state = None
        self.model = base_model  # the current policy (a PeftModel after the first round)
        self.steps = 0
        if peft_config is None and reference_model is None:
            raise ValueError("full fine-tuning needs a frozen reference_model")

    def train_round(self, pairs: list[dict], round_index: int) -> dict:
        from datasets import Dataset
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from trl import DPOTrainer

        if self.peft_config is not None and self.model is not self.base_model:
            self.base_model = self.model.unload()  # LoRA layers out, base (= reference) weights untouched
        callbacks = []
        if self.step_logger is not None:
            self.step_logger.start_round(round_index, self.steps)
            callbacks.append(self.step_logger.callback)
        trainer = DPOTrainer(
            model=self.base_model, ref_model=self.reference_model, args=self.dpo_config,
            train_dataset=Dataset.from_list(trainer_examples(pairs)), processing_class=self.tokenizer,
            peft_config=self.peft_config, callbacks=callbacks,
        )  # fmt: skip
        if self.adapter_state is not None:
            set_peft_model_state_dict(trainer.model, self.adapter_state)
        result = trainer.train()
        self.model = trainer.model
        if self.peft_config is not None:
            self.adapter_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        self.steps += result.global_step
        history = [row for row in trainer.state.log_history if "loss" in row]
        last = history[-1] if history else {}
        keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")  # fmt: skip
        metrics = {f"train_{k.replace('/', '_')}": last[k] for k in keys if k in last}
        metrics.update(train_steps=result.global_step, train_pairs=len(pairs),
                       train_loss_mean=result.training_loss)  # fmt: skip
        return metrics
