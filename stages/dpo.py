"""DPO: align the SFT model with preferences, offline (human pairs) or on-policy (reward model).

Consumes
    - runs/<run>/sft: the policy to train AND the reference (LoRA: the adapter-disabled
      model is the reference, no second copy of the weights)
    - runs/<run>/reward: the reward model (its quality gate is checked: reward_gate_policy)
    - `ranked_files`: ranked responses (data/README.md). offline: turned into pairs as the
      reward stage does (align.preferences); on_policy: only their prompts are used
    - `eval_file`: held-out prompts, never trained on: SFT vs DPO mean reward is measured there

Produces runs/<run>/dpo/: model/ (merged, Hugging Face format), adapter/ (LoRA),
samples/eval_{sft,dpo}.jsonl (held-out samples with reward and house-style scores),
rounds/round-<n>-pairs.jsonl, logs/ (stage.log, steps.jsonl, rounds.jsonl, and per `report_to`
tensorboard/ and/or wandb/),
config.yaml, manifest.json (parent: the SFT stage; reward_model: the reward stage).

Modes
    on_policy  rounds of: sample K responses per train prompt from the current policy
               (align.generation; vLLM where it is faster), score them with the reward
               model, keep best vs worst when the gap >= min_reward_margin, one TRL DPO
               pass on those pairs, push the new weights into the running generator.
    offline    one TRL DPO run on the human preference pairs.

Both modes first sample the SFT model on the held-out prompts and, after training,
the DPO model with the same decoding settings and seed, and judge them with the
statistics of `make compare` (align.online.HeldOut): the paired reward difference
and the win rate with their 95% intervals, KL(DPO || SFT), length and cut-answer
changes, and a verdict (better only when both intervals clear no-effect).

Answers cut at max_new_tokens (rounds and held-out) are never treated as finished:
they score `truncation_penalty` below the reward model and never enter a pair.

Up to date (same config, SFT and reward parents, data, code and versions as the finished
runs/<run>/dpo): one line, nothing retrained; `--force` redoes it (align/runs.py).
Interrupted (SIGTERM, kill -9): the same command goes on after the last finished on-policy
round, or offline from the last checkpoint of its TRL pass (every `save_steps`), kept in
runs/<run>/.dpo.resume/ (align/resume.py).

Several processes (torchrun / accelerate launch, both modes): every rank trains its share of
each batch under DDP. Rank 0 alone holds the generator and the reward model: it samples and scores
each round's prompts, picks the pairs and sends them to every rank, pushes the trained weights
into its engine, samples the held-out prompts, and writes the stage folder while the others wait
(align/processes.py). One engine, not one per rank: on a CPU, engines per rank would split the same
cores; on GPUs the engine can be a vLLM server on its own device (generation_backend openai); and
a 2-rank run samples exactly what a 1-rank run does (round sampling is seeded per round), so it
trains on the same pairs (tests/test_distributed.py).

Run: make dpo [RUN=name] [ARGS="--mode offline --beta 8 ..."]
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Literal

from trl import DPOConfig, ModelConfig

from align import data, dpo_rounds, files, hardware, online, preferences, processes, resume, runs, trackers, training
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary, warn_skipped
from align.errors import ConfigError
from align.generation import SamplingSettings
from align.hardware import Precision
from align.model_card import write_model_card
from align.preferences import Aggregation, BadRankingPolicy, TieMode


@dataclass
class DPOStageArgs:
    run: str = field(default="default", metadata={"help": "run name: parents runs/<run>/{sft,reward}, output runs/<run>/dpo"})
    mode: Literal["on_policy", "offline"] = field(default="on_policy", metadata={"help": "on_policy | offline"})
    sft_dir: str | None = field(default=None, metadata={"help": "an explicit SFT stage folder instead of runs/<run>/sft"})
    reward_dir: str | None = field(default=None, metadata={"help": "an explicit reward stage folder"})
    reward_gate_policy: runs.GatePolicy = field(default="warn", metadata={"help": "reward model failed its gate: warn | refuse"})
    ranked_files: list[str] = field(default_factory=lambda: ["data/ranked.jsonl"],
                                    metadata={"help": "ranked responses: offline pairs / on-policy prompts"})
    precision: Precision = field(default="auto", metadata={"help": "training autocast: auto | bf16 | fp32"})
    # offline pairs
    ties: TieMode = field(default="drop", metadata={"help": "drop | soft (align.preferences)"})
    aggregation: Aggregation = field(default="mean_rank", metadata={"help": "mean_rank | majority"})
    bad_rankings: BadRankingPolicy = field(default="skip", metadata={"help": "skip | refuse"})
    offline_pairs: Literal["best_vs_worst", "all"] = field(
        default="best_vs_worst", metadata={"help": "best_vs_worst (one pair per prompt) | all"})
    # on-policy rounds
    rounds: int = field(default=3, metadata={"help": "on-policy rounds"})
    prompts_per_round: int = field(default=64, metadata={"help": "train prompts sampled per round"})
    samples_per_prompt: int = field(default=4, metadata={"help": "K responses per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rounds"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rounds"})
    max_new_tokens: int = field(default=256, metadata={
        "help": "response length cap of the rounds: 2x the 95th percentile of the example SFT answers"})
    min_reward_margin: float = field(default=0.5, metadata={"help": "keep best vs worst only when r_best - r_worst >= this"})
    min_reward_margin_units: dpo_rounds.MarginUnits = field(default="reward", metadata={
        "help": "reward (min_reward_margin as it is) | std (x the standard deviation of the round's scores)"})
    truncated_answers: Literal["drop", "keep"] = field(default="drop", metadata={
        "help": "answers cut at max_new_tokens: drop (never paired) | keep (paired as if they had ended)"})
    pair_selection: dpo_rounds.PairSelection = field(default="length_matched", metadata={
        "help": "best_vs_worst | length_matched (largest gap among pairs of similar length)"})
    pair_length_tolerance: float = field(default=0.25, metadata={
        "help": "length_matched: lengths may differ by this fraction of the longer answer"})
    # held-out evaluation and sampling: align.online.HeldOutArgs, GenerationArgs (shared with PPO)
    kl_max_samples: int = field(default=64, metadata={"help": "samples per KL estimate"})
    lora_top_layers: int | None = training.lora_top_layers_field(default=None)


def check_args(args: DPOStageArgs, dpo_config: DPOConfig) -> None:
    """What a type cannot say (choices are Literal types, checked by the parser)."""
    for key in ("rounds", "prompts_per_round", "max_new_tokens", "kl_max_samples"):
        if getattr(args, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(args, key)}")
    if args.samples_per_prompt < 2:
        raise ConfigError(f"samples_per_prompt: on-policy pairs need >= 2 samples per prompt, got {args.samples_per_prompt}")
    if not 0 <= args.pair_length_tolerance <= 1:
        raise ConfigError(f"pair_length_tolerance: must be in [0, 1], got {args.pair_length_tolerance}")
    if args.min_reward_margin < 0:
        raise ConfigError(f"min_reward_margin: must be >= 0, got {args.min_reward_margin}")
    if dpo_config.beta <= 0:
        raise ConfigError(f"beta: must be > 0, got {dpo_config.beta}")


def load_train_inputs(args: DPOStageArgs, heldout: list[dict]) -> tuple[list[list[dict]], list[dict], preferences.PairReport]:
    """(train prompts, offline pairs, pair report); every file validated before any model loads.

    Train prompts: the distinct prompts of the ranked data, minus any that are also held out."""
    records = [record for path in args.ranked_files for record in data.load_ranked(path)]
    pairs, report = preferences.ranked_to_pairs(records, args.ties, args.aggregation, args.bad_rankings)
    if args.offline_pairs == "best_vs_worst":
        pairs = dpo_rounds.best_vs_worst(pairs)
    if args.mode == "offline":
        preferences.require_pairs(pairs, report, args.ranked_files)
    return preferences.train_prompts(records, heldout, args.ranked_files), pairs, report


def main(argv=None):
    parsed = parse_stage_config(
        "dpo", (DPOStageArgs, online.HeldOutArgs, online.GenerationArgs, ModelConfig, DPOConfig), argv)
    args, heldout_args, sampler, model_args, dpo_config = parsed
    check_args(args, dpo_config)
    tracker_names = trackers.requested_trackers(dpo_config.report_to)

    # Inputs, parents and the reward model, all checked before the policy loads.
    heldout = heldout_args.heldout("dpo")
    prompts, offline_pairs, pair_report = load_train_inputs(args, heldout.records)
    config = resolved_config(args, heldout_args, sampler, model_args, dpo_config)
    sft, fingerprint = online.policy_parents("dpo", args, config, [*args.ranked_files, heldout_args.eval_file])
    if runs.skip_if_up_to_date(args.run, "dpo", config, fingerprint, parsed.force):
        return
    warn_skipped(heldout.skipped)  # after the up-to-date check: a skipped stage stays quiet
    bf16 = hardware.use_bf16(args.precision)
    # Several processes: rank 0 samples and scores (rounds and held-out prompts), the others only train.
    samples_here = processes.current().is_main
    scorer = sampler.scorer(args.run, args.reward_gate_policy, args.reward_dir, bf16) if samples_here else None
    tokenizer, policy, peft_config, reference = online.load_policy(sft, model_args, args.lora_top_layers)

    with runs.stage_output(args.run, "dpo", config, dpo_config.seed, parent=sft, fingerprint=fingerprint) as out:
        started = time.time()
        if scorer is not None:
            out.set(reward_model=scorer.checkpoint.as_parent())
        for path in args.ranked_files:
            out.add_input(path, "ranked")
        out.add_input(heldout_args.eval_file, "eval prompts", len(heldout.records))
        # The inner TRL trainers report to none: each round builds a new one whose step count starts
        # at 0 again, so the StepLogger puts their steps on ONE timeline across rounds and sends it,
        # with the round and held-out numbers, to the trackers report_to chose.
        # Resume: on-policy checkpoints after each round; offline, the one TRL pass checkpoints every save_steps.
        if args.mode == "on_policy":
            checkpoints = resume.RoundCheckpoints(out, fingerprint, parsed.force)
        else:
            checkpoints = resume.TrainerCheckpoints(out, fingerprint, parsed.force)
        trl_config = training.fit_to_hardware(dataclasses.replace(dpo_config, report_to="none"), args.precision, out.path,
                                              checkpoints.folder if args.mode == "offline" else None)
        training.record_effective_batch(out, trl_config)
        with trackers.open_trackers(tracker_names, out, config) as tracked:
            step_logger = online.StepLogger(tracked)
            trainer = dpo_rounds.RoundTrainer(policy, tokenizer, trl_config, peft_config, step_logger, reference)
            timer = online.PhaseTimer()
            out.say(f"[dpo] mode {args.mode}: {len(prompts)} train prompts, {len(offline_pairs)} human pairs, "
                    f"{len(heldout.records)} held-out prompts; reference = "
                    f"{'the adapter-disabled SFT model' if peft_config else 'a frozen copy of the SFT model'}")

            engine = sampler.generator(sft.model_path, seed=dpo_config.seed) if samples_here else contextlib.nullcontext()
            with engine as generator:
                if not samples_here:  # another rank: train on what rank 0 sends, then wait for it at the barrier
                    if args.mode == "on_policy":
                        run_rounds(args, heldout_args, trainer, None, None, prompts, timer, tracked, out, bf16,
                                   checkpoints)
                    else:
                        train_offline(trainer, None, offline_pairs, timer, out, checkpoints)
                    return
                with timer.phase("eval"):
                    sft_eval = heldout.sample_sft(generator, scorer, sft, out.say)
                if args.mode == "on_policy":
                    round_rows = run_rounds(args, heldout_args, trainer, generator, scorer, prompts, timer, tracked, out,
                                            bf16, checkpoints)
                else:
                    round_rows = [train_offline(trainer, generator, offline_pairs, timer, out, checkpoints)]
                with timer.phase("eval"):
                    dpo_eval, kl = heldout.sample_policy(generator, scorer, "DPO", trainer.model, tokenizer,
                                                       heldout_args.kl_estimator, reference_model=reference)
                backend = generator.describe()
            verdict = heldout.verdict("dpo", sft_eval, dpo_eval, kl)
            tracked.log("heldout_sft", sft_eval.summary(), 0)
            tracked.log("heldout_dpo", dpo_eval.summary(), 0)

        files.write_jsonl(out.path / "samples" / "eval_sft.jsonl", sft_eval.records(heldout.prompt_ids))
        files.write_jsonl(out.path / "samples" / "eval_dpo.jsonl", dpo_eval.records(heldout.prompt_ids))
        files.write_jsonl(out.logs_dir / "steps.jsonl", step_logger.rows)
        files.write_jsonl(out.logs_dir / "rounds.jsonl", round_rows)
        # no pair in any round: nothing was trained and the policy is still the plain SFT model
        training.save_outputs(trainer.model, tokenizer, out, use_peft=trainer.steps > 0 and peft_config is not None)
        training.remove_trainer_scratch(out)
        out.set(generation_backend=backend, pair_report=pair_report.as_metrics() if args.mode == "offline" else None)
        out.metrics.update(mode=args.mode,
                           **online.heldout_metrics("dpo", heldout, sft_eval, dpo_eval, heldout_args.kl_estimator, verdict),
                           rounds=round_rows, train_steps=trainer.steps, bf16=trl_config.bf16,
                           **timer.as_metrics(), total_s=round(time.time() - started, 1),
                           cost=online.cost_report(timer, bf16, generator, scorer))
        write_model_card(out.model_dir, out.manifest)  # inside the temporary folder: a crashed stage has no card
    checkpoints.finish()
    m = out.metrics
    summary("dpo", mode=f"{args.mode} ({len(round_rows)} round{'s' * (len(round_rows) != 1)}, {trainer.steps} steps)",
            **online.summary_fields("dpo", m, timer.phases), output=str(out.path))
    print(verdict["verdict_line"], flush=True)


def train_offline(trainer, generator, pairs: list[dict], timer, out, checkpoints) -> dict:
    """One DPO pass over the human pairs (resumed from its last checkpoint after a kill); the
    generator then samples the trained policy. Under several processes every rank trains (TRL's
    DDP); only rank 0 has a generator (None elsewhere) and writes."""
    if out.is_main:
        files.write_jsonl(out.path / "rounds" / "offline-pairs.jsonl", pairs)
    with timer.phase("train"):
        metrics = trainer.train_round(pairs, 1, train=lambda dpo: checkpoints.train(
            dpo, replay=lambda history: [trainer.step_logger.log(row["step"], row) for row in history]))
    if generator is not None:
        with timer.phase("sync"):
            generator.update_weights(trainer.model)
    return {"round": 1, **metrics}


def run_rounds(args, heldout_args, trainer, generator, scorer, prompts, timer, tracked, out, bf16,
               checkpoints) -> list[dict]:
    """On-policy rounds; returns one metrics row per round (also in the trackers under round/).
    Each finished round is checkpointed; an interrupted run's rerun goes on after its last one.

    Several processes: rank 0 (the one with a `generator`) samples, scores and pairs; every rank
    trains on the pairs it sends (other ranks get generator and scorer None, and their rows are
    not used)."""
    rows, first = [], 0
    restored = checkpoints.restore(trainer, out.path / "rounds", args.rounds)
    if restored is not None:
        rows, first = restored["rows"], restored["round"]
        trainer.step_logger.replay(restored["step_rows"])
        for row in rows:
            tracked.log("round", row, row["round"], skip=("round",))
        if generator is not None:
            with timer.phase("sync"):
                generator.update_weights(trainer.model)  # the next round samples the restored policy
    for index in range(first, args.rounds):
        number = index + 1
        if generator is None:  # another rank: rank 0's pairs
            pairs = processes.from_main(None)
            if pairs:
                trainer.train_round(pairs, number)
            checkpoints.save_round(number, trainer, {}, [])  # rank 0 alone writes
            continue
        round_set = online.round_prompts(prompts, index, args.prompts_per_round, trainer.dpo_config.seed)
        settings = SamplingSettings(n=args.samples_per_prompt, temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens,
                                    seed=online.round_seed(trainer.dpo_config.seed, number))
        fresh = online.sample_and_score(generator, scorer, round_set, settings, timer,
                                        progress=f"round {number}/{args.rounds}",
                                        truncation_penalty=heldout_args.truncation_penalty)
        with timer.phase("score"):
            if index > 0:  # before the first round the policy is the reference: KL is 0
                fresh.kl = online.measure_kl(trainer.model, trainer.tokenizer, fresh, args.kl_max_samples,
                                             heldout_args.kl_estimator, bf16, reference_model=trainer.reference_model)
            else:
                fresh.kl = {"kl": 0.0, "kl_per_token": 0.0}
        finished = fresh.finished() if args.truncated_answers == "drop" else None
        margin = dpo_rounds.margin_threshold(fresh.scores, args.min_reward_margin, args.min_reward_margin_units, finished)
        pairs, counts = dpo_rounds.select_pairs(
            round_set, fresh.texts(), fresh.scores, margin, finished=finished, lengths=fresh.lengths(),
            selection=args.pair_selection, length_tolerance=args.pair_length_tolerance)
        counts["min_reward_margin"] = margin  # in reward units, whatever the config's units
        pairs = processes.from_main(pairs)  # to every other rank (itself in a single process)
        files.write_jsonl(out.path / "rounds" / f"round-{number}-samples.jsonl", fresh.records())
        files.write_jsonl(out.path / "rounds" / f"round-{number}-pairs.jsonl", pairs)
        row = {"round": number, **{f"fresh_{k}": v for k, v in fresh.summary().items() if not isinstance(v, str)},
               **counts}
        if pairs:
            with timer.phase("train"):
                row.update(trainer.train_round(pairs, number))
            with timer.phase("sync"):
                row["sync_s"] = generator.update_weights(trainer.model)
        else:
            print(f"[dpo] round {number}: no pair reached a reward gap of {margin:.3f} (min_reward_margin "
                  f"{args.min_reward_margin} {args.min_reward_margin_units}); "
                  "nothing to train on (lower min_reward_margin or raise samples_per_prompt)", flush=True)
        row.update(timer.as_metrics())  # cumulative seconds per phase after this round
        rows.append(row)
        print(f"[dpo] round {number}/{args.rounds}: fresh mean reward {row['fresh_mean_reward']:.3f}, "
              f"style {row['fresh_style_score']:.2f}, KL {row.get('fresh_kl', 0):.2f}, {counts['pairs']} pairs, "
              f"DPO reward accuracy {row.get('train_rewards_accuracies', float('nan')):.2f}", flush=True)
        tracked.log("round", row, number, skip=("round",))
        checkpoints.save_round(number, trainer, {"rows": rows, "step_rows": trainer.step_logger.rows},
                               sorted((out.path / "rounds").glob("round-*.jsonl")))  # every round's so far
    return rows


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_stage(main)
