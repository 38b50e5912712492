"""Reward: a reward model from human rankings, and a verdict on whether it is usable.

Consumes
    - runs/<run>/sft (its manifest names the model folder); or `model_name_or_path`
      to start from another model without an SFT parent
    - `ranked_files`: ranked-responses JSONL (data/README.md), one or several;
      and/or `argilla_dataset`: rankings pulled from Argilla (saved as rankings.jsonl)

Produces runs/<run>/reward/: model/ (merged AutoModelForSequenceClassification,
num_labels 1), adapter/ (LoRA + score head), pairs/{train,heldout}.jsonl,
heldout_scores.jsonl, report.md with calibration.png and length.png (align/reports.py),
config.yaml, logs/, manifest.json (metrics include gate_passed and gate_reasons).

Features and assumptions
    - Rankings become pairs by align.preferences (ties, several annotators, bad
      rankings reported with file:line); the held-out split is by prompt.
    - TRL RewardTrainer, LoRA with the `score` head trained in full; pad != eos.
    - `train_sampling_strategy: group_by_length` batches pairs of similar length (TRL pads
      both sides of every pair in a batch to its longest text); random batches by default.
    - `length_decorrelation: λ` adds λ·corr(reward, log answer length)² per batch to TRL's loss
      (align/length_bias.py): for data where length rides along with the label; off by default.
    - The text scored is align.scoring.reward_text, in training, in the
      evaluation here and in every later stage.
    - Quality gate on the held-out pairs: pairwise accuracy, mean margin,
      calibration (ECE), length correlation; thresholds `gate_*` in the config
      (align.evaluation.reward_gate: one structured check per threshold).
      A failed gate is printed loudly and recorded; the stage still completes,
      and later stages warn or refuse (their `reward_gate_policy`).

Several processes (torchrun / accelerate launch): every rank trains; rank 0 alone saves,
measures the gate and writes the report (align/runs.py).

Up to date (same config, SFT parent, rankings, code and versions as the finished
runs/<run>/reward): one line, nothing retrained; `--force` redoes it (align/runs.py).
With `argilla_dataset` the rankings are pulled first, so new submissions rerun it.
Interrupted (SIGTERM, kill -9): the same command resumes from the last checkpoint, saved every
`save_steps` and at SIGTERM in runs/<run>/.reward.resume/ (align/resume.py).

Run: make reward [RUN=name] [ARGS="--num_train_epochs 2 ..."]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, RewardConfig, RewardTrainer

from align import (cost, data, evaluation, files, hardware, length_bias, models, preferences, reports, resume, runs,
                   scoring, trackers, training)
from align.config import parse_stage_config, resolved_config
from align.console import run_stage, summary, warn
from align.errors import ConfigError
from align.hardware import Precision
from align.model_card import write_model_card
from align.preferences import Aggregation, BadRankingPolicy, TieMode


@dataclass
class RewardStageArgs:
    run: str = field(default="default", metadata={"help": "run name: parent runs/<run>/sft, outputs runs/<run>/reward"})
    sft_dir: str | None = field(default=None, metadata={"help": "an SFT stage folder instead of runs/<run>/sft"})
    ranked_files: list[str] = field(default_factory=lambda: ["data/ranked.jsonl"],
                                    metadata={"help": "ranked-responses JSONL file(s)"})
    argilla_dataset: str | None = field(default=None, metadata={"help": "Argilla ranking dataset to pull"})
    argilla_workspace: str = field(default="align", metadata={"help": "workspace of argilla_dataset"})
    precision: Precision = field(default="auto", metadata={"help": "auto | bf16 | fp32"})
    ties: TieMode = field(default="drop", metadata={"help": "drop | soft"})
    aggregation: Aggregation = field(default="mean_rank", metadata={"help": "mean_rank | majority"})
    bad_rankings: BadRankingPolicy = field(default="skip", metadata={"help": "skip | refuse"})
    use_margin: bool = field(default=False, metadata={"help": "pass rank margins to the loss"})
    length_decorrelation: float = field(default=0.0, metadata={
        "help": "weight of corr(reward, log response length)^2 per batch added to the loss (align/length_bias.py); "
                "0 = off"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "share of prompts held out for the gate"})
    gate_min_accuracy: float | None = field(default=0.6, metadata={"help": "min held-out pairwise accuracy"})
    gate_min_mean_margin: float | None = field(default=0.0, metadata={"help": "min mean r_chosen - r_rejected"})
    gate_max_ece: float | None = field(default=0.2, metadata={"help": "max expected calibration error"})
    gate_max_abs_length_corr: float | None = field(default=0.5, metadata={"help": "max |Spearman(score, length)|"})
    calibration_bins: int = field(default=10, metadata={"help": "bins for ECE and the calibration plot"})
    score_batch_size: int = field(default=16, metadata={"help": "batch size when scoring held-out pairs"})
    score_dtype: Precision = field(default="fp32", metadata={"help": "auto | bf16 | fp32 for held-out scoring"})
    lora_top_layers: int | None = training.lora_top_layers_field(default=8)


LENGTH_SAMPLERS = ("group_by_length", "batch_rebalance")  # transformers' samplers that read a length per row


def main(argv=None):
    parsed = parse_stage_config("reward", (RewardStageArgs, ModelConfig, RewardConfig), argv)
    args, model_args, reward_config = parsed
    tracker_names = trackers.requested_trackers(reward_config.report_to)
    if reward_config.train_sampling_strategy in LENGTH_SAMPLERS or args.length_decorrelation:
        # the sampler reads the dataset's `length` column and the length term its `chosen_tokens` and
        # `rejected_tokens` (scoring.reward_dataset), which the Trainer would drop as no argument of
        # the model's forward; TRL's collator ignores the extra columns
        reward_config.remove_unused_columns = False
    if args.length_decorrelation < 0:
        raise ConfigError(f"length_decorrelation must be >= 0 (0 = off), got {args.length_decorrelation}")
    if not args.ranked_files and not args.argilla_dataset:
        raise ConfigError("ranked_files is empty and argilla_dataset is not set: nothing to train on")

    # Inputs and pairs, checked before any output is written or model loads: bad data fails in seconds.
    records, inputs = [], []
    for path in args.ranked_files:
        loaded = data.load_ranked(path)
        records += loaded
        inputs.append((path, len(loaded)))
    pulled = pull_from_argilla(args) if args.argilla_dataset else None
    if pulled is not None:
        records += pulled
    pairs, pair_report = preferences.ranked_to_pairs(records, args.ties, args.aggregation, args.bad_rankings)
    sources = [*args.ranked_files, *([f"Argilla dataset {args.argilla_dataset}"] if pulled else [])]
    preferences.require_pairs(pairs, pair_report, sources)  # no pair at all: refused before any model loads
    parent, base = find_start_model(args, model_args)
    config = resolved_config(args, model_args, reward_config)
    fingerprint = runs.stage_fingerprint("reward", config, parents={"sft": parent},
                                         inputs=fingerprint_inputs(args, model_args, base, pulled))
    if runs.skip_if_up_to_date(args.run, "reward", config, fingerprint, parsed.force):
        return
    tokenizer = models.load_tokenizer(base)
    show_bad_rankings(pair_report)  # after the up-to-date check, which prints one line and nothing else
    train_pairs, heldout_pairs = preferences.split_by_prompt(pairs, args.heldout_fraction, reward_config.seed)
    train_pairs, too_long_train = drop_too_long(tokenizer, train_pairs, reward_config.max_length)
    heldout_pairs, too_long_heldout = drop_too_long(tokenizer, heldout_pairs, reward_config.max_length)
    if not train_pairs:
        raise ConfigError("no training pairs left after ties, bad rankings, the split and max_length; see above")
    split_counts = {
        "train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs),
        "train_prompts": len(preferences.pairs_by_prompt(train_pairs)),
        "heldout_prompts": len(preferences.pairs_by_prompt(heldout_pairs)),
        "dropped_too_long_train": too_long_train, "dropped_too_long_heldout": too_long_heldout,
    }

    with runs.stage_output(args.run, "reward", config, reward_config.seed, parent=parent, fingerprint=fingerprint) as out:
        for path, count in inputs:
            out.add_input(path, "ranked", count)
        if out.is_main:  # the files, and the manifest that hashes them, are rank 0's
            if pulled is not None:
                files.write_jsonl(out.path / "rankings.jsonl", [_without_source(r) for r in pulled])
                out.add_input(out.path / "rankings.jsonl", "ranked (argilla)", len(pulled))
            files.write_jsonl(out.path / "pairs" / "train.jsonl", train_pairs)
            files.write_jsonl(out.path / "pairs" / "heldout.jsonl", heldout_pairs)
        out.metrics.update(pair_report.as_metrics(), **split_counts)

        training.record_model_facts(out, tokenizer, model_args.model_name_or_path or f"runs/{args.run}/sft", base)
        checkpoints = resume.TrainerCheckpoints(out, fingerprint, parsed.force)
        with trackers.open_trackers(tracker_names, out, config, trainer_writes_tensorboard=True):
            trainer_args = training.fit_to_hardware(reward_config, args.precision, out.path, checkpoints.folder)
            training.record_effective_batch(out, trainer_args)
            trainer_class, length_term = RewardTrainer, {}
            if args.length_decorrelation:  # TRL's loss + the length term (align/length_bias.py)
                trainer_class = length_bias.LengthDecorrelatedRewardTrainer
                length_term = {"length_decorrelation": args.length_decorrelation}
            trainer = trainer_class(
                model=base,  # TRL loads it as AutoModelForSequenceClassification, num_labels=1, new score head
                args=trainer_args,
                train_dataset=scoring.reward_dataset(tokenizer, train_pairs, args.use_margin,
                                                     response_lengths=bool(args.length_decorrelation)),
                processing_class=tokenizer,
                peft_config=training.lora_config(model_args, args.lora_top_layers, base),
                **length_term,
            )
            training.refuse_sharded_weights(trainer)
            total, trainable = models.count_parameters(trainer.model)
            out.say(f"[reward] {pair_report.records} rankings -> {len(pairs)} pairs on {pair_report.prompts} prompts; "
                    f"train {len(train_pairs)} pairs / held-out {len(heldout_pairs)} pairs "
                    f"({split_counts['heldout_prompts']} prompts); {trainable / 1e6:.2f}M of {total / 1e6:.1f}M "
                    "parameters trainable")
            with cost.phase("train"), training.counted(trainer):
                result = checkpoints.train(trainer)  # from the last checkpoint of an interrupted run, if any

        training.save_trained(trainer, tokenizer, out, model_args.use_peft)
        out.metrics.update(
            train_loss=result.training_loss,
            train_steps=result.global_step,
            train_runtime_s=result.metrics.get("train_runtime"),
            trainable_parameters=trainable,
            bf16=hardware.use_bf16(args.precision),
            loss_curve=training.loss_curve(trainer),
        )
        del trainer
        if not out.is_main:  # the gate, report and card are rank 0's; the others wait at stage_output's barrier
            return
        with cost.phase("eval"):
            metrics, gate = finish_output(out, args, tokenizer, heldout_pairs, pair_report, split_counts)
        out.metrics["cost"] = cost.report("bfloat16" if hardware.use_bf16(args.precision) else "float32",
                                          phase_dtypes={"eval": hardware.torch_dtype_name(args.score_dtype)})
    checkpoints.finish()
    summary("reward", gate="PASS" if gate.passed else "FAIL",
            heldout_accuracy=_fmt(metrics.get("pairwise_accuracy")), ece=_fmt(metrics.get("ece")),
            length_corr=_fmt(metrics.get("length_correlation")), pairs=f"{len(train_pairs)}+{len(heldout_pairs)}",
            train_loss=result.training_loss, compute=cost.summary_text(out.metrics["cost"]), output=str(out.path))


def finish_output(out, args, tokenizer, heldout_pairs, pair_report, split_counts):
    """The gate on the saved model (the artefact later stages load), its report and the model card."""
    metrics, gate = evaluate_heldout(out, args, tokenizer, heldout_pairs)
    out.metrics.update(**metrics)
    reports.write_reward_report(out.path, args.run, pair_report, split_counts, metrics, gate, ties=args.ties,
                                aggregation=args.aggregation, bad_rankings=args.bad_rankings,
                                calibration_bins=args.calibration_bins)
    if not gate.passed:  # loud, and in logs/stage.log too
        warn("reward model FAILED its quality gate: " + "; ".join(gate.reasons) + ". See "
             f"{runs.stage_dir(args.run, 'reward') / 'report.md'}. Later stages will warn or refuse "
             "(their reward_gate_policy).")
    write_model_card(out.model_dir, out.manifest)  # inside the temporary folder: a crashed stage has no card
    return metrics, gate


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def find_start_model(args, model_args) -> tuple[runs.Checkpoint | None, str]:
    """The SFT parent (its manifest names the model), unless model_name_or_path says otherwise."""
    if model_args.model_name_or_path:
        if args.sft_dir:
            raise ConfigError("give either model_name_or_path or sft_dir, not both")
        return None, models.resolve_model(model_args.model_name_or_path)
    parent = runs.find_checkpoint(args.run, ["sft"], args.sft_dir)
    return parent, parent.model_path


def fingerprint_inputs(args, model_args, base: str, pulled: list[dict] | None) -> dict[str, str]:
    """The ranked files, the rankings pulled from Argilla (by content: new submissions rerun the
    stage) and, without an SFT parent, the base model."""
    inputs = runs.data_inputs(*args.ranked_files)
    if pulled is not None:
        # without `source`: it numbers records in pull order, which the server need not keep
        inputs.update(runs.records_input(f"argilla {args.argilla_workspace}/{args.argilla_dataset}",
                                         [_without_source(record) for record in pulled]))
    if model_args.model_name_or_path:
        inputs.update(runs.model_input(model_args.model_name_or_path, base))
    return inputs


def pull_from_argilla(args) -> list[dict]:
    """Rankings from Argilla, checked like a file; their sources name the rankings.jsonl
    line the stage will save them to (runs/<run>/reward/rankings.jsonl:N)."""
    from align import argilla_io  # lazily: the stage needs Argilla only when asked to pull

    client = argilla_io.connect()
    pulled = argilla_io.retrying(f"pulling rankings from {args.argilla_workspace}/{args.argilla_dataset}",
                                 client.api_url,
                                 lambda: argilla_io.pull_rankings(client, args.argilla_dataset, args.argilla_workspace))
    for problem in getattr(pulled, "problems", []):
        warn(f"argilla {args.argilla_dataset} record {problem['record_id']} ({problem['annotator']}): "
             f"{problem['problem']}; left out")
    print(f"[reward] pulled {len(pulled)} rankings from Argilla dataset {args.argilla_dataset!r}", flush=True)
    if not pulled:
        return []
    final = runs.stage_dir(args.run, "reward") / "rankings.jsonl"  # where the stage saves them
    return [data.ranked_record(final, line, row) for line, row in enumerate(pulled, start=1)]


def _without_source(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "source"}


def show_bad_rankings(report: preferences.PairReport, limit: int = 20) -> None:
    for bad in report.bad[:limit]:
        warn(f"bad ranking skipped: {bad}")
    if len(report.bad) > limit:
        warn(f"... and {len(report.bad) - limit} more bad rankings (all listed in report.md)")


def drop_too_long(tokenizer, pairs: list[dict], max_length: int | None) -> tuple[list[dict], int]:
    """RewardTrainer silently drops pairs longer than max_length: drop them here, counted."""
    if max_length is None:
        return pairs, 0
    kept = []
    for pair in pairs:
        lengths = [len(scoring.reward_ids(tokenizer, scoring.reward_text(tokenizer, pair["prompt"], pair[side])))
                   for side in ("chosen", "rejected")]
        if max(lengths) <= max_length:
            kept.append(pair)
    return kept, len(pairs) - len(kept)


def evaluate_heldout(out, args, tokenizer, heldout_pairs: list[dict]) -> tuple[dict, evaluation.GateResult]:
    """(manifest metrics, gate) on the held-out pairs, scored by the saved model through RewardScorer;
    writes heldout_scores.jsonl, calibration.png and length.png."""
    thresholds = {
        "min_accuracy": args.gate_min_accuracy,
        "min_mean_margin": args.gate_min_mean_margin,
        "max_ece": args.gate_max_ece,
        "max_abs_length_corr": args.gate_max_abs_length_corr,
    }
    if not heldout_pairs:
        gate = evaluation.GateResult.not_measured(
            "no held-out pairs (heldout_fraction 0 or too few prompts): the gate could not be checked")
        return {"gate_passed": gate.passed, "gate_reasons": gate.reasons, "gate_thresholds": thresholds}, gate
    scorer = scoring.RewardScorer(out.model_dir, batch_size=args.score_batch_size,
                                  dtype=hardware.torch_dtype_name(args.score_dtype))
    chosen, rejected = scorer.score_pairs(heldout_pairs, progress="[reward] scoring held-out pairs")
    probabilities, outcomes = evaluation.pair_probabilities(chosen, rejected)
    # Length bias: every distinct held-out response once, with its score and length in tokens.
    responses: dict[tuple[str, str], tuple[float, int]] = {}
    for pair, c, r in zip(heldout_pairs, chosen, rejected):
        key = preferences.prompt_key(pair["prompt"])
        responses[(key, pair["chosen"])] = (c, scoring.response_length(tokenizer, pair["chosen"]))
        responses[(key, pair["rejected"])] = (r, scoring.response_length(tokenizer, pair["rejected"]))
    scores, lengths = zip(*responses.values())
    length_corr = evaluation.length_correlation(scores, lengths) if len(scores) > 1 else float("nan")
    pair_lengths = [(responses[(preferences.prompt_key(p["prompt"]), p["chosen"])][1],
                     responses[(preferences.prompt_key(p["prompt"]), p["rejected"])][1]) for p in heldout_pairs]
    chosen_longer = sum(len_c > len_r for len_c, len_r in pair_lengths)
    # the model's own length preference, counted like the data's: the strictly longer answer scored higher
    longer_scored_higher = sum((len_c > len_r and c > r) or (len_r > len_c and r > c)
                               for (len_c, len_r), c, r in zip(pair_lengths, chosen, rejected))
    metrics = {
        "pairwise_accuracy": evaluation.pairwise_accuracy(chosen, rejected),
        "mean_margin": evaluation.mean_margin(chosen, rejected),
        "ece": evaluation.expected_calibration_error(probabilities, outcomes, args.calibration_bins),
        "length_correlation": length_corr,
        "chosen_longer_fraction": chosen_longer / len(heldout_pairs),  # the data's own length preference
        "longer_scored_higher_fraction": longer_scored_higher / len(heldout_pairs),  # the model's
    }
    low_high = evaluation.bootstrap_mean_ci(
        [float(c > r) + 0.5 * float(c == r) for c, r in zip(chosen, rejected)], seed=0
    )
    metrics["pairwise_accuracy_ci95"] = [low_high[1], low_high[2]]
    gate = evaluation.reward_gate(metrics, thresholds)
    rows = [{"prompt_id": p["prompt_id"], "r_chosen": c, "r_rejected": r, "chosen_tokens":
             responses[(preferences.prompt_key(p["prompt"]), p["chosen"])][1], "rejected_tokens":
             responses[(preferences.prompt_key(p["prompt"]), p["rejected"])][1]}
            for p, c, r in zip(heldout_pairs, chosen, rejected)]
    files.write_jsonl(out.path / "heldout_scores.jsonl", rows)
    table = evaluation.calibration_bins(probabilities, outcomes, args.calibration_bins)
    reports.plot_calibration(out.path / reports.REWARD_PLOTS["calibration"], table)
    reports.plot_length(out.path / reports.REWARD_PLOTS["length"], scores, lengths, length_corr)
    return {**metrics, "gate_passed": gate.passed, "gate_reasons": gate.reasons, "gate_thresholds": thresholds,
            "calibration_table": table}, gate


if __name__ == "__main__":
    run_stage(main)
