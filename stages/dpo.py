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
rounds/round-<n>-pairs.jsonl, logs/ (stage.log, steps.jsonl, rounds.jsonl, tensorboard/),
config.yaml, manifest.json (parent: the SFT stage; reward_model: the reward stage).

Modes
    on_policy  rounds of: sample K responses per train prompt from the current policy
               (align.generation; vLLM where it is faster), score them with the reward
               model, keep best vs worst when the gap >= min_reward_margin, one TRL DPO
               pass on those pairs, push the new weights into the running generator.
    offline    one TRL DPO run on the human preference pairs.

Both modes first sample the SFT model on the held-out prompts and, after training,
the DPO model with the same decoding settings and seed: mean reward-model score,
house-style score, length, and KL(DPO || SFT) from those samples.

Run: make dpo [RUN=name] [ARGS="--mode offline --beta 0.2 ..."]
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

from trl import DPOConfig, ModelConfig

from align import data, dpo_rounds, hardware, models, preferences, runs, training
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary
from align.errors import ConfigError
from align.generation import SamplingSettings, create_generator
from align.scoring import RewardScorer

MODES = ("on_policy", "offline")


@dataclass
class DPOStageArgs:
    run: str = field(default="default", metadata={"help": "run name: parents runs/<run>/{sft,reward}, output runs/<run>/dpo"})
    mode: str = field(default="on_policy", metadata={"help": "on_policy | offline"})
    sft_dir: str | None = field(default=None, metadata={"help": "an explicit SFT stage folder instead of runs/<run>/sft"})
    reward_dir: str | None = field(default=None, metadata={"help": "an explicit reward stage folder"})
    reward_gate_policy: str = field(default="warn", metadata={"help": "reward model failed its gate: warn | refuse"})
    ranked_files: list[str] = field(default_factory=lambda: ["data/ranked.jsonl"],
                                    metadata={"help": "ranked responses: offline pairs / on-policy prompts"})  # fmt: skip
    eval_file: str = field(default="data/eval_prompts.jsonl", metadata={"help": "held-out prompts"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp32"})
    # offline pairs
    ties: str = field(default="drop", metadata={"help": "drop | soft (align.preferences)"})
    aggregation: str = field(default="mean_rank", metadata={"help": "mean_rank | majority"})
    bad_rankings: str = field(default="skip", metadata={"help": "skip | refuse"})
    offline_pairs: str = field(default="best_vs_worst", metadata={"help": "best_vs_worst (one pair per prompt) | all"})
    # on-policy rounds
    rounds: int = field(default=2, metadata={"help": "on-policy rounds"})
    prompts_per_round: int = field(default=64, metadata={"help": "train prompts sampled per round"})
    samples_per_prompt: int = field(default=4, metadata={"help": "K responses per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rounds"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rounds"})
    max_new_tokens: int = field(default=128, metadata={"help": "response length cap of the rounds"})
    min_reward_margin: float = field(default=0.5, metadata={"help": "keep best vs worst only when r_best - r_worst >= this"})
    # held-out evaluation
    eval_samples_per_prompt: int = field(default=2, metadata={"help": "samples per held-out prompt"})
    eval_temperature: float = field(default=1.0, metadata={"help": "1.0 samples the policy itself (KL needs it)"})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "response length cap on held-out prompts"})
    eval_limit: int | None = field(default=None, metadata={"help": "use only the first N held-out prompts"})
    kl_estimator: str = field(default="k3", metadata={"help": "k1 | k3 (align.logprobs)"})
    kl_max_samples: int = field(default=64, metadata={"help": "samples per KL estimate"})
    # generation and scoring
    generation_backend: str = field(default="auto", metadata={"help": "auto | vllm | hf | openai"})
    generation_dtype: str = field(default="auto", metadata={"help": "auto | bf16 | fp32"})
    server_url: str | None = field(default=None, metadata={"help": "openai backend: vLLM server URL"})
    kv_cache_gib: float = field(default=1.0, metadata={"help": "vLLM KV cache size"})
    weight_push_timeout_s: float = field(default=120.0, metadata={"help": "give up on a stuck weight push"})
    score_batch_size: int = field(default=16, metadata={"help": "reward model batch"})
    score_dtype: str = field(default="auto", metadata={"help": "reward model weights: auto | bf16 | fp32"})
    lora_top_layers: int | None = field(default=None, metadata={
        "help": "LoRA only in the top N transformer layers (null: every layer); backward stops there"})


def check_args(args: DPOStageArgs, dpo_config: DPOConfig) -> None:
    choices = {"mode": MODES, "reward_gate_policy": ("warn", "refuse"), "offline_pairs": ("all", "best_vs_worst"),
               "kl_estimator": ("k1", "k3"), "score_dtype": ("auto", "bf16", "fp32")}  # fmt: skip
    for key, allowed in choices.items():
        if getattr(args, key) not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {getattr(args, key)!r}")
    for key in ("rounds", "prompts_per_round", "max_new_tokens", "eval_samples_per_prompt", "eval_max_new_tokens",
                "kl_max_samples", "score_batch_size"):  # fmt: skip
        if getattr(args, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {getattr(args, key)}")
    if args.samples_per_prompt < 2:
        raise ConfigError(f"samples_per_prompt: on-policy pairs need >= 2 samples per prompt, got {args.samples_per_prompt}")
    if args.min_reward_margin < 0:
        raise ConfigError(f"min_reward_margin: must be >= 0, got {args.min_reward_margin}")
    if dpo_config.beta <= 0:
        raise ConfigError(f"beta: must be > 0, got {dpo_config.beta}")


def load_train_inputs(args: DPOStageArgs) -> tuple[list[dict], list[dict], preferences.PairReport]:
    """(ranked records, offline pairs, pair report); every file validated before any model loads."""
    records = []
    for path in args.ranked_files:
        records.extend(data.load_ranked(path))
    pairs, report = preferences.ranked_to_pairs(records, args.ties, args.aggregation, args.bad_rankings)
    if args.offline_pairs == "best_vs_worst":
        pairs = dpo_rounds.best_vs_worst(pairs)
    return records, pairs, report


def train_prompts(records: list[dict], held_out: list[dict]) -> list[list[dict]]:
    """Distinct prompts of the ranked data, minus any that also appear in the held-out file."""
    excluded = {preferences.prompt_key(record["prompt"]) for record in held_out}
    seen, prompts = set(), []
    for record in records:
        key = preferences.prompt_key(record["prompt"])
        if key not in seen and key not in excluded:
            seen.add(key)
            prompts.append(record["prompt"])
    return prompts


def main(argv=None):
    args, model_args, dpo_config = parse_stage_config("dpo", (DPOStageArgs, ModelConfig, DPOConfig), argv)
    check_args(args, dpo_config)

    # Inputs: data and parents checked before any model loads.
    records, offline_pairs, pair_report = load_train_inputs(args)
    eval_records = data.load_prompts(args.eval_file)[: args.eval_limit]
    prompts = train_prompts(records, eval_records)
    if args.mode == "offline" and not offline_pairs:
        raise ConfigError(f"{', '.join(args.ranked_files)}: no usable preference pairs for mode offline")
    if not prompts:
        raise ConfigError(f"{', '.join(args.ranked_files)}: no train prompts left after removing held-out ones")
    sft = runs.find_checkpoint(args.run, ["sft"], args.sft_dir)
    reward = runs.find_checkpoint(args.run, ["reward"], args.reward_dir)
    runs.require_parent_gate(reward, args.reward_gate_policy)

    tokenizer = models.load_tokenizer(sft.model_path)
    policy = models.load_causal_lm(sft.model_path)
    peft_config = training.lora_config(model_args, args.lora_top_layers, sft.model_path)
    reference = None if peft_config else models.load_causal_lm(sft.model_path).eval()
    bf16 = hardware.use_bf16(args.precision)
    score_dtype = {"auto": "bfloat16" if bf16 else "float32", "bf16": "bfloat16", "fp32": "float32"}[args.score_dtype]

    config = resolved_config(args, model_args, dpo_config)
    with runs.stage_output(args.run, "dpo", config, dpo_config.seed, parent=sft) as out:
        started = time.time()
        out.set(reward_model=reward.as_parent())
        for path in args.ranked_files:
            out.add_input(path, "ranked")
        out.add_input(args.eval_file, "eval prompts", len(eval_records))
        trl_config = training.fit_to_hardware(dpo_config, args.precision, out.path)
        trl_config = dataclasses.replace(trl_config, report_to="none")  # StepLogger writes TensorBoard itself
        writer = tensorboard_writer(out)
        step_logger = dpo_rounds.StepLogger(writer)
        trainer = dpo_rounds.RoundTrainer(policy, tokenizer, trl_config, peft_config, step_logger, reference)
        scorer = RewardScorer(reward.model_path, batch_size=args.score_batch_size, dtype=score_dtype)
        timer = dpo_rounds.PhaseTimer()
        eval_prompts = [record["prompt"] for record in eval_records]
        eval_ids = [record["prompt_id"] for record in eval_records]
        eval_settings = SamplingSettings(n=args.eval_samples_per_prompt, temperature=args.eval_temperature,
                                         max_new_tokens=args.eval_max_new_tokens, seed=None)  # fmt: skip
        print(f"[dpo] mode {args.mode}: {len(prompts)} train prompts, {len(offline_pairs)} human pairs, "
              f"{len(eval_prompts)} held-out prompts; reference = "
              f"{'the adapter-disabled SFT model' if peft_config else 'a frozen copy of the SFT model'}", flush=True)  # fmt: skip

        with create_generator(sft.model_path, args.generation_backend, args.generation_dtype,
                              server_url=args.server_url, weight_push_timeout_s=args.weight_push_timeout_s,
                              kv_cache_gib=args.kv_cache_gib, seed=dpo_config.seed) as generator:  # fmt: skip
            with timer.phase("eval"):
                sft_eval = dpo_rounds.sample_and_score(generator, scorer, eval_prompts, eval_settings,
                                                       dpo_rounds.PhaseTimer(), progress="held-out: SFT")  # fmt: skip
            round_rows = []
            if args.mode == "on_policy":
                round_rows = run_rounds(args, trainer, generator, scorer, prompts, timer, writer, out, bf16)
            else:
                write_pairs(out, "offline", offline_pairs)
                with timer.phase("train"):
                    metrics = trainer.train_round(offline_pairs, 1)
                with timer.phase("sync"):
                    generator.update_weights(trainer.model)
                round_rows.append({"round": 1, **metrics})
            with timer.phase("eval"):
                dpo_eval = dpo_rounds.sample_and_score(generator, scorer, eval_prompts, eval_settings,
                                                       dpo_rounds.PhaseTimer(), progress="held-out: DPO")  # fmt: skip
                dpo_eval.kl = dpo_rounds.measure_kl(trainer.model, tokenizer, dpo_eval, args.kl_max_samples,
                                                    args.kl_estimator, bf16, reference_model=reference)  # fmt: skip
            backend = generator.describe()

        write_jsonl(out.path / "samples" / "eval_sft.jsonl", sft_eval.records(eval_ids))
        write_jsonl(out.path / "samples" / "eval_dpo.jsonl", dpo_eval.records(eval_ids))
        write_jsonl(out.logs_dir / "steps.jsonl", step_logger.rows)
        write_jsonl(out.logs_dir / "rounds.jsonl", round_rows)
        sft_summary, dpo_summary = sft_eval.summary(), dpo_eval.summary()
        if writer is not None:
            for name, values in (("sft", sft_summary), ("dpo", dpo_summary)):
                for key, value in values.items():
                    if isinstance(value, (int, float)):
                        writer.add_scalar(f"heldout_{name}/{key}", value, 0)
            writer.close()

        model_out = save_policy(trainer, tokenizer, out, peft_config is not None)
        training.remove_trainer_scratch(out)
        out.set(outputs=model_out, generation_backend=backend,
                pair_report=pair_report.as_metrics() if args.mode == "offline" else None)  # fmt: skip
        out.metrics.update(
            mode=args.mode,
            mean_reward_sft=sft_summary["mean_reward"], mean_reward_dpo=dpo_summary["mean_reward"],
            reward_gain=dpo_summary["mean_reward"] - sft_summary["mean_reward"],
            beats_sft=dpo_summary["mean_reward"] > sft_summary["mean_reward"],
            style_score_sft=sft_summary["style_score"], style_score_dpo=dpo_summary["style_score"],
            response_tokens_sft=sft_summary["response_tokens"], response_tokens_dpo=dpo_summary["response_tokens"],
            kl=dpo_summary.get("kl"), kl_per_token=dpo_summary.get("kl_per_token"), kl_estimator=args.kl_estimator,
            heldout_prompts=len(eval_prompts), heldout_samples=dpo_summary["samples"],
            eval_decoding=dataclasses.asdict(eval_settings), heldout_sft=sft_summary, heldout_dpo=dpo_summary,
            rounds=round_rows, train_steps=trainer.steps, bf16=trl_config.bf16,
            **timer.as_metrics(), total_s=round(time.time() - started, 1),
        )  # fmt: skip
    m = out.metrics
    summary("dpo", mode=f"{args.mode} ({len(round_rows)} round{'s' * (len(round_rows) != 1)}, {trainer.steps} steps)",
            mean_reward=f"SFT {m['mean_reward_sft']:.3f} -> DPO {m['mean_reward_dpo']:.3f} ({m['reward_gain']:+.3f})",
            KL=f"{m['kl']:.2f} nats" if m["kl"] is not None else "n/a",
            style=f"{m['style_score_sft']:.2f} -> {m['style_score_dpo']:.2f}",
            tokens=f"{m['response_tokens_sft']:.0f} -> {m['response_tokens_dpo']:.0f}",
            time_s="generate {time_generate_s:.0f} / score {time_score_s:.0f} / train {time_train_s:.0f} / "
                   "sync {time_sync_s:.1f} / eval {time_eval_s:.0f}".format(**m),
            output=str(out.path))  # fmt: skip


def run_rounds(args, trainer, generator, scorer, prompts, timer, writer, out, bf16) -> list[dict]:
    """On-policy rounds; returns one metrics row per round (also in TensorBoard under round/)."""
    settings_seed = trainer.dpo_config.seed
    rows = []
    for index in range(args.rounds):
        number = index + 1
        round_set = dpo_rounds.round_prompts(prompts, index, args.prompts_per_round, settings_seed)
        settings = SamplingSettings(n=args.samples_per_prompt, temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, seed=None)  # fmt: skip
        fresh = dpo_rounds.sample_and_score(generator, scorer, round_set, settings, timer,
                                            progress=f"round {number}/{args.rounds}")  # fmt: skip
        with timer.phase("score"):
            if index > 0:  # before the first round the policy is the reference: KL is 0
                fresh.kl = dpo_rounds.measure_kl(trainer.model, trainer.tokenizer, fresh, args.kl_max_samples,
                                                 args.kl_estimator, bf16, reference_model=trainer.reference_model)  # fmt: skip
            else:
                fresh.kl = {"kl": 0.0, "kl_per_token": 0.0}
        pairs, counts = dpo_rounds.select_pairs(round_set, fresh.texts(), fresh.scores, args.min_reward_margin)
        write_pairs(out, f"round-{number}", pairs)
        row = {"round": number, **{f"fresh_{k}": v for k, v in fresh.summary().items() if not isinstance(v, str)},
               **counts}  # fmt: skip
        if pairs:
            with timer.phase("train"):
                row.update(trainer.train_round(pairs, number))
            with timer.phase("sync"):
                row["sync_s"] = generator.update_weights(trainer.model)
        else:
            print(f"[dpo] round {number}: no pair reached min_reward_margin {args.min_reward_margin}; "
                  "nothing to train on (lower min_reward_margin or raise samples_per_prompt)", flush=True)  # fmt: skip
        row.update(timer.as_metrics())  # cumulative seconds per phase after this round
        rows.append(row)
        print(f"[dpo] round {number}/{args.rounds}: fresh mean reward {row['fresh_mean_reward']:.3f}, "
              f"style {row['fresh_style_score']:.2f}, KL {row.get('fresh_kl', 0):.2f}, {counts['pairs']} pairs, "
              f"DPO reward accuracy {row.get('train_rewards_accuracies', float('nan')):.2f}", flush=True)  # fmt: skip
        if writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "round":
                    writer.add_scalar(f"round/{key}", value, number)
    return rows


def save_policy(trainer, tokenizer, out, is_peft: bool) -> dict:
    if is_peft:
        return training.save_peft_outputs(trainer.model, tokenizer, out)
    training.save_model(trainer.model, tokenizer, out.model_dir)
    return {"model": "model"}


def write_pairs(out, name: str, pairs: list[dict]) -> None:
    write_jsonl(out.path / "rounds" / f"{name}-pairs.jsonl", pairs)


def write_jsonl(path, rows) -> None:
    data.write_jsonl(path, rows)  # atomic: temporary file, then rename


def tensorboard_writer(out):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the jsonl logs still hold everything
        return None
    return SummaryWriter(log_dir=str(out.logs_dir / "tensorboard"))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_stage(main)
