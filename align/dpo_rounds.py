"""The DPO-specific pieces: pairs for TRL, and one policy trained over rounds of pairs.

On-policy DPO (one round; sampling, scoring and timing are `align.online`'s):

    fresh   = online.sample_and_score(generator, scorer, prompts, settings, timer)  # the current policy
    pairs   = select_pairs(...)                             # best vs worst, if the score gap >= margin_threshold(...)
    trainer.train_round(pairs)                              # TRL DPOTrainer, reference = adapter-disabled SFT
    generator.update_weights(trainer.model)                 # the next round samples from the new policy

`margin_threshold`, `select_pairs`, `best_vs_worst` and `trainer_examples` are pure. `RoundTrainer` keeps one LoRA
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

import json
import statistics
from typing import TYPE_CHECKING, Literal

from align import training

if TYPE_CHECKING:
    from align.online import StepLogger


PairSelection = Literal["best_vs_worst", "length_matched"]
MarginUnits = Literal["reward", "std"]


def margin_threshold(scores: list[list[float]], min_margin: float, units: MarginUnits,
                     finished: list[list[bool]] | None = None) -> float:
    """The reward gap a round's pair needs, in the reward model's units.

    `reward`: `min_margin` itself. `std`: `min_margin` x the population standard deviation of the
    round's scores (of its finished answers when `finished` is given: the ones pairs are made of).
    Reward models put their scores on different scales (the example reward model's samples spread
    0.86-0.94, HH's 0.37), so a margin in standard deviations carries over from one to another where
    an absolute one keeps almost every pair on one and almost none on the other."""
    if units == "reward":
        return min_margin
    values = [value for index, row in enumerate(scores) for i, value in enumerate(row)
              if finished is None or finished[index][i]]
    return min_margin * statistics.pstdev(values) if len(values) > 1 else 0.0


def select_pairs(prompts: list[list[dict]], responses: list[list[str]], scores: list[list[float]],
                 min_margin: float, finished: list[list[bool]] | None = None, lengths: list[list[int]] | None = None,
                 selection: PairSelection = "best_vs_worst", length_tolerance: float = 0.25) -> tuple[list[dict], dict]:
    """One pair per prompt from its sampled responses, kept when the reward gap is at least `min_margin`.

    - Cut answers (`finished` False: the sample hit max_new_tokens) never enter a pair. The reward
      model scores a cut answer as if it had ended there, so a long answer cut mid-sentence tends
      to be a prompt's worst, and best-vs-worst pairs would then teach "shorter" for length alone.
    - `best_vs_worst`: the highest- against the lowest-scored finished response.
      `length_matched`: the largest gap among pairs whose lengths (`lengths`, tokens) differ by at
      most `length_tolerance` x the longer one, so a pair cannot be won by length alone.
    - Identical texts are never paired (a gap between equal texts is scoring noise), nor equal scores.

    Returns (pairs in the `align.preferences` format, counts for the round log)."""
    if not len(prompts) == len(responses) == len(scores):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} response lists, {len(scores)} score lists")
    if selection == "length_matched" and lengths is None:
        raise ValueError("length_matched pairs need the responses' lengths")
    pairs, small_margin, no_variety, cut_samples, too_few_finished = [], 0, 0, 0, 0
    for index, (prompt, texts, values) in enumerate(zip(prompts, responses, scores)):
        if len(texts) != len(values):
            raise ValueError(f"{len(texts)} responses but {len(values)} scores for one prompt")
        if len(set(texts)) < 2:
            no_variety += 1
            continue
        usable = [i for i in range(len(texts)) if finished is None or finished[index][i]]
        cut_samples += len(texts) - len(usable)
        if len({texts[i] for i in usable}) < 2:
            too_few_finished += 1
            continue
        if selection == "length_matched":
            sizes = lengths[index]
            candidates = [(values[a] - values[b], a, b) for a in usable for b in usable
                          if values[a] > values[b] and abs(sizes[a] - sizes[b]) <= length_tolerance * max(sizes[a], sizes[b])]
            margin, best, worst = max(candidates) if candidates else (0.0, usable[0], usable[0])
        else:
            best = max(usable, key=lambda i: values[i])
            worst = min(usable, key=lambda i: values[i])
            margin = values[best] - values[worst]
        if texts[best] == texts[worst] or margin <= 0 or margin < min_margin:  # equal scores: no preference
            small_margin += 1
            continue
        pair = {"prompt": prompt, "chosen": texts[best], "rejected": texts[worst], "margin": float(margin),
                "chosen_score": float(values[best]), "rejected_score": float(values[worst])}
        if lengths is not None:
            pair.update(chosen_tokens=lengths[index][best], rejected_tokens=lengths[index][worst])
        pairs.append(pair)
    counts = {"prompts": len(prompts), "pairs": len(pairs), "dropped_small_margin": small_margin,
              "dropped_identical": no_variety,
              "pair_margin_mean": statistics.fmean(p["margin"] for p in pairs) if pairs else 0.0}
    if finished is not None:
        counts.update(cut_samples_left_out=cut_samples, dropped_too_few_finished=too_few_finished)
    if lengths is not None and pairs:
        counts["pair_chosen_longer_fraction"] = statistics.fmean(p["chosen_tokens"] > p["rejected_tokens"] for p in pairs)
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
             "rejected": [{"role": "assistant", "content": pair["rejected"]}]} for pair in pairs]


# ---------------------------------------------------------------------------


class RoundTrainer:
    """TRL DPO on one set of pairs at a time, one policy across rounds (see the module docstring)."""

    def __init__(self, base_model, tokenizer, dpo_config, peft_config, step_logger: StepLogger | None = None,
                 reference_model=None):
        self.base_model, self.tokenizer = base_model, tokenizer
        self.dpo_config, self.peft_config = dpo_config, peft_config
        self.step_logger = step_logger
        self.reference_model = reference_model  # full fine-tuning only
        self.adapter_state = None
        self.model = base_model  # the current policy (a PeftModel after the first round)
        self.steps = 0
        if peft_config is None and reference_model is None:
            raise ValueError("full fine-tuning needs a frozen reference_model")

    def restore_adapter(self, adapter_state: dict, steps: int) -> None:
        """The policy of a resumed run: the base model with the saved adapter, as a round leaves it
        (the next `train_round` unloads it again, like any round's)."""
        from peft import get_peft_model, set_peft_model_state_dict

        self.model = get_peft_model(self.base_model, self.peft_config)
        set_peft_model_state_dict(self.model, adapter_state)
        self.adapter_state, self.steps = adapter_state, steps

    def dataset(self, pairs: list[dict], round_index: int):
        """The pairs as a datasets.Dataset; under several processes one saved on disk that every rank loads.

        Why on disk: TRL 1.16's precomputed reference log-probs are written by rank 0 to a cache file
        next to the dataset's own files and then read by every rank from that path. An in-memory
        dataset has no files, so each process names a file in its own temporary folder and rank 1
        fails with FileNotFoundError; a dataset loaded from one shared folder gives every rank the
        same path."""
        from datasets import Dataset, load_from_disk

        from align import processes

        examples = Dataset.from_list(trainer_examples(pairs))
        me = processes.current()
        if not me.distributed:
            return examples
        folder = f"{self.dpo_config.output_dir}/pairs-round-{round_index}"
        if me.is_main:
            examples.save_to_disk(folder)
        processes.barrier()
        return load_from_disk(folder)

    def train_round(self, pairs: list[dict], round_index: int, train=None) -> dict:
        """Train on `pairs`; `train(dpo_trainer)` runs the TRL trainer (default: its .train(); the
        offline pass gives align.resume's, which resumes from a checkpoint)."""
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
            train_dataset=self.dataset(pairs, round_index), processing_class=self.tokenizer,
            peft_config=self.peft_config, callbacks=callbacks,
        )
        training.refuse_sharded_weights(trainer)  # rank 0 saves the merged model: whole weights only
        if self.adapter_state is not None:
            set_peft_model_state_dict(trainer.model, self.adapter_state)
        precomputed = self.dpo_config.precompute_ref_log_probs
        if precomputed:  # the reference's one forward over the pairs ran inside DPOTrainer(...)
            training.count_reference_pass(trainer)
        with training.counted(trainer, reference_forward=not precomputed):
            result = train(trainer) if train is not None else trainer.train()
        self.model = trainer.model
        if self.peft_config is not None:
            self.adapter_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        self.steps += result.global_step
        history = [row for row in trainer.state.log_history if "loss" in row]
        last = history[-1] if history else {}
        keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")
        metrics = {f"train_{k.replace('/', '_')}": last[k] for k in keys if k in last}
        metrics.update(train_steps=result.global_step, train_pairs=len(pairs),
                       train_loss_mean=result.training_loss)
        return metrics
